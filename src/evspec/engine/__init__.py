"""Fast batch-1 engines: one per model, used by feature extraction, stage timing and speculation."""
