"""evspec: measure and accelerate cross-modal speculative decoding.

An event-camera LLM (EventGPT) drafts answers that a video LLM (Video-LLaVA) verifies.
Every stage is a `python -m evspec <command>`; the Snakefile only wires them.
"""

__version__ = "0.1.0"
