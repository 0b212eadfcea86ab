"""Run-directory files, written crash-safe and read back without trusting them.

A run directory can be copied around, edited, truncated by a full disk or tampered with, so
reading one never unpickles (no code can run), checks sizes before allocating (a garbled
length field cannot ask for gigabytes) and turns every damaged file into a one-line
`RunFileError` naming it. Writes go through a temporary file, fsync, rename and a fsync of
the directory: after a crash or a full disk the old file or the new one is there, never half.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from fedlora.errors import ConfigError

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on its JSON header
MAX_JSON_BYTES = 100_000_000


class RunFileError(ConfigError):
    """A run-directory file is missing, damaged, altered or unwritable: one line, exit 2."""


class DiskFullError(RunFileError):
    pass


def atomic_write(path: Path, data: bytes | str | Callable[[Path], None]) -> None:
    """Write `data` (or let `data(tmp)` write) to a temporary file, fsync, rename over `path`
    and fsync the directory: a crash leaves the old file or the new one. A full disk raises
    DiskFullError naming `path` (the temporary file is removed, the old file stays)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:
        if not _disk_full(err):
            raise
        tmp.unlink(missing_ok=True)
        raise DiskFullError(f"disk full: could not write {path} (its previous version, if any, is intact); "
                            "free some space and resume") from None


def _disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return "basic_ios::clear" in str(err)  # torch's C++ stream error on a failed write


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a crash after it cannot resurrect the old name)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_bounded(path: Path, max_bytes: int) -> bytes:
    """A file's bytes, refused (one line) when missing or larger than `max_bytes`."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise RunFileError(f"run error: {path}: file not found") from None
    if size > max_bytes:
        raise RunFileError(f"run error: {path}: {size} bytes, more than the {max_bytes} a run file may have")
    return path.read_bytes()


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    try:
        return json.loads(read_bounded(path, max_bytes))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RunFileError(f"run error: {path}: not valid JSON (truncated or damaged)") from None


def tensors_to_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return safetensors_bytes({k: v.detach().contiguous() for k, v in tensors.items()}, metadata)


def load_tensors(path: Path, max_bytes: int = 1 << 40, expected_sha256: str | None = None,
                 ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; its header length is checked against the
    file size before anything is parsed, and its SHA-256 against `expected_sha256` if given."""
    path = Path(path)
    data = read_bounded(path, max_bytes)
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise RunFileError(f"run error: {path}: altered, truncated or replaced since it was written "
                           "(SHA-256 differs from the checkpoint's record)")
    header = safetensors_header(path, data)
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise RunFileError(f"run error: {path}: damaged safetensors file ({err})") from None
    return tensors, header.get("__metadata__") or {}


def safetensors_header(path: Path, data: bytes) -> dict[str, Any]:
    """The JSON header of safetensors bytes, validated for size before it is decoded."""
    if len(data) < 8:
        raise RunFileError(f"run error: {path}: truncated ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise RunFileError(f"run error: {path}: damaged or truncated (header length {n}, file {len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise RunFileError(f"run error: {path}: damaged safetensors header")
    return header
