"""Fingerprints: what produced a cached result, so a changed input means a rerun, not stale reuse.

Three kinds, each a short hex digest:
- `code_version(modules)`: the evspec source a stage runs. The Snakefile passes it as a
  rule param (Snakemake does not see what a command imports), and caches stamp it.
- `model_fingerprint(directory)`: a checkpoint's config and weights, hashed by content.
- `settings_digest(values)`: canonical JSON of any settings mapping.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parent
CHUNK_BYTES = 1 << 24
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def code_version(*modules: str) -> str:
    """Hash of evspec modules (files or packages with their templates, relative to src/evspec)."""
    digest = hashlib.sha256()
    for module in sorted(modules):
        path = SOURCE / module
        files = sorted([*path.rglob("*.py"), *path.rglob("*.j2")]) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(SOURCE)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def model_fingerprint(directory: str | Path) -> str:
    """Content hash of a checkpoint directory's config.json and weight files (not its tokenizer)."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.name == "config.json" or path.name.endswith(WEIGHT_SUFFIXES):
            digest.update(path.name.encode())
            digest.update(file_digest(path).encode())
    return digest.hexdigest()[:16]


def settings_digest(values: Any) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]
