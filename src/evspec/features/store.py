"""The HDF5 feature cache: one record per clip, stamped with what produced it, resumable.

Layout of `features/{model}.h5`:

    attrs: fingerprint (canonical JSON: model, preprocessing, code, options), digest
    samples/{key}/            one group per clip; key = sample id with '/' -> '~'
        answer_ids  [L] int32       the target's greedy answer (EOS included when reached)
        hidden      [L, H]          final hidden state whose lm_head gives answer_ids[i]
        projected   [N, H]          LLM-width visual tokens (draft: always; target: fields="all")
        vision      [K, P, D]       vision tower tokens (fields="all")
        attrs: complete = 1         written last: a group without it is a half-written record

Every array is LZ4-compressed with a Fletcher-32 checksum per chunk and must be finite: a flipped byte
or a NaN is an `InputError` naming the file, the record and the field, at write or at read.

Records are written to `.{name}.partial` beside the final path and flushed one by one;
a rerun after a kill reopens the partial file, drops half-written records, skips the
complete ones and continues. Only a finished cache is renamed to the final name, so
Snakemake never sees a partial one as done. A partial file stamped with another
fingerprint, or one a kill left unreadable, is discarded and rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from evspec.atomic import unwritable_error
from evspec.errors import InputError
from evspec.fingerprint import settings_digest
from evspec.h5 import lz4_checksummed, open_h5

log = logging.getLogger(__name__)

FLOAT_DTYPES = {"float32": np.float32, "float16": np.float16}


def sample_key(sample_id: str) -> str:
    return sample_id.replace("/", "~")


def partial_path(final_path: Path) -> Path:
    return final_path.with_name(f".{final_path.name}.partial")


class FeatureWriter:
    """Appends complete records to the partial cache; `finish` renames it into place."""

    def __init__(self, final_path: Path, fingerprint: dict, precision: str) -> None:
        self.final_path = Path(final_path)
        self.partial = partial_path(self.final_path)
        self.fingerprint = json.dumps(fingerprint, sort_keys=True)
        self.dtype = FLOAT_DTYPES[precision]
        try:
            self.handle = self._open_or_restart()
        except OSError as error:
            raise unwritable_error(self.partial, error) from error
        self.done = {key for key, group in self.handle["samples"].items() if group.attrs.get("complete") == 1}

    def _open_or_restart(self) -> h5py.File:
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            try:
                handle = h5py.File(self.partial, "a")
            except OSError as error:
                log.warning("%s: unreadable partial cache (killed mid-write?), starting over: %s", self.partial, error)
            else:
                if handle.attrs.get("fingerprint") == self.fingerprint and "samples" in handle:
                    for key in [k for k, group in handle["samples"].items() if group.attrs.get("complete") != 1]:
                        del handle["samples"][key]  # half-written record from the killed run
                    return handle
                handle.close()
                log.warning("%s: partial cache made by other inputs, starting over", self.partial)
            self.partial.unlink()
        handle = h5py.File(self.partial, "w")
        handle.attrs["fingerprint"] = self.fingerprint
        handle.attrs["digest"] = settings_digest(json.loads(self.fingerprint))
        handle.create_group("samples")
        return handle

    def write(self, sample_id: str, arrays: dict[str, np.ndarray]) -> None:
        """One complete record; the `complete` mark is set and flushed only after every array."""
        try:
            group = self.handle["samples"].create_group(sample_key(sample_id))
            for name, array in arrays.items():
                dtype = np.int32 if np.issubdtype(array.dtype, np.integer) else self.dtype
                stored = array.astype(dtype)
                require_finite(self.partial, sample_id, name, stored)  # an overflow stops here, named
                group.create_dataset(name, data=stored, chunks=array.shape or None, **lz4_checksummed())
            self.handle.flush()
        except OSError as error:  # h5py reports a full disk as an OSError without errno
            raise InputError(self.partial, f"cannot write record {sample_id!r} (disk full?): {error}") from error
        group.attrs["complete"] = 1
        self.handle.flush()
        self.done.add(sample_key(sample_id))

    def finish(self, expected_ids: list[str]) -> None:
        """Check every id is present, close and rename the partial cache to the final name."""
        missing = [i for i in expected_ids if sample_key(i) not in self.done]
        self.handle.close()
        if missing:
            raise RuntimeError(f"{self.partial}: {len(missing)} records missing at finish, e.g. {missing[:3]}")
        os.replace(self.partial, self.final_path)

    def close(self) -> None:
        if self.handle.id.valid:
            self.handle.close()


class FeatureReader:
    """Reads a finished cache after checking it was made by the expected inputs."""

    def __init__(self, path: Path, expected_fingerprint: dict | None = None) -> None:
        self.path = Path(path)
        with open_h5(self.path) as handle:
            if "fingerprint" not in handle.attrs or "samples" not in handle:
                raise InputError(self.path, "not an evspec feature cache (no fingerprint or samples group)")
            self.fingerprint = json.loads(handle.attrs["fingerprint"])
            self.keys = sorted(handle["samples"])
        if expected_fingerprint is not None:
            check_fingerprint(self.path, self.fingerprint, expected_fingerprint)

    def records(self, sample_ids: list[str], fields: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
        """Records of `sample_ids` in order; a missing id or field is an `InputError`."""
        with open_h5(self.path) as handle:
            samples = handle["samples"]
            for sample_id in sample_ids:
                group = samples.get(sample_key(sample_id))
                if group is None or group.attrs.get("complete") != 1:
                    raise InputError(self.path, f"no complete record for sample {sample_id!r}")
                missing = [f for f in fields if f not in group]
                if missing:
                    raise InputError(self.path, f"record {sample_id!r} lacks {missing} (extracted with fewer fields?)")
                record = {}
                for name in fields:
                    try:
                        record[name] = group[name][()]
                    except OSError as error:  # the chunk's checksum failed, or it does not decompress
                        raise InputError(self.path, f"record {sample_id!r}, field {name!r} is corrupt "
                                                    f"(checksum or decompression failed): {error}") from error  # fmt: skip
                    require_finite(self.path, sample_id, name, record[name])
                yield record


def require_finite(path: Path, sample_id: str, name: str, array: np.ndarray) -> None:
    """Float features must be finite: NaN or inf (an fp16 overflow, a corrupt older cache without checksums)
    is an `InputError` naming the file, the record and the field."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise InputError(path, f"record {sample_id!r}, field {name!r} holds {bad} non-finite values")


def check_fingerprint(path: Path, found: dict, expected: dict) -> None:
    """Refuse a cache whose fingerprint differs, naming the parts that differ."""
    differing = sorted(key for key in set(found) | set(expected) if found.get(key) != expected.get(key))
    if differing:
        details = "; ".join(f"{key}: cache has {found.get(key)!r}, config gives {expected.get(key)!r}" for key in differing)
        raise InputError(path, f"feature cache was made by other inputs ({details}); rerun extract-features")


def bytes_per_sample(shapes: dict[str, tuple[int, ...]], precision: str) -> int:
    """Uncompressed bytes of one record of the given float field shapes."""
    return int(sum(np.prod(shape) for shape in shapes.values()) * np.dtype(FLOAT_DTYPES[precision]).itemsize)
