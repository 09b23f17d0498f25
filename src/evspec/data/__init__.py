"""The data stage: recordings -> clips -> manifest.parquet + tensors.h5."""
