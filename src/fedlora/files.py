"""Run-directory files, written crash-safe and read back without trusting them.

A run directory can be copied around, edited, truncated by a full disk or tampered with, so
reading one never unpickles (no code can run), never follows a symbolic link below the folder
the user named (a planted `run.lock → ~/.bashrc` or `eval → /etc` cannot redirect a write or a
read), counts the bytes it actually reads against a limit (a file that links to /dev/zero, a
FIFO or a sparse file cannot make it allocate gigabytes; `stat()` is never trusted), limits
the depth and the number of containers of any JSON it parses, and turns every damaged file into
a one-line `RunFileError` naming it. Writes go through a temporary file, fsync, rename and a
fsync of the directory: after a crash or a full disk the old file or the new one is there,
never half. Every name that becomes a path component (a method label, a variant, a run key)
passes `safe_name`, the one rule for them.

The folder a caller names (`inside`, by default the file's own folder) may itself be a link:
that is the user's choice of where a run lives. Everything below it is opened with
O_NOFOLLOW, one component at a time, from the folder's file descriptor.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from fedlora.errors import ConfigError

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on its JSON header
MAX_JSON_BYTES = 100_000_000
MAX_JSON_DEPTH = 64
"""Our JSON nests 5 deep (a metrics record's client table); 64 leaves room and stops a
"[[[[…" file long before the parser's recursion."""
BYTES_PER_CONTAINER = 8
"""An empty `[]` costs Python ~60 bytes for 2 bytes of text: a JSON text may hold at most one
array or object per 8 bytes (ours hold one per 50 or more), so parsing it costs a bounded
multiple of its size, never 40×."""
CHUNK = 1 << 20

_FOLLOW_NONE = os.O_NOFOLLOW | os.O_CLOEXEC


class RunFileError(ConfigError):
    """A run-directory file is missing, damaged, altered or unwritable: one line, exit 2."""


class DiskFullError(RunFileError):
    pass


# --- names ------------------------------------------------------------------------------------

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""Letters, digits, `.`, `_`, `-`, starting with a letter or digit, at most 100 characters: no
separator, no `..`, no absolute path, no hidden file, nothing a shell or a filesystem reads
specially."""


def safe_name(name: object, field: str) -> str:
    """`name` if it may become one path component, else a one-line ConfigError naming `field`:
    the one rule for method labels, variant names and run keys."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ConfigError(f"config error: {field}: {str(name)[:80]!r} cannot name a folder (use letters, digits, "
                          "'.', '_' and '-', starting with a letter or digit, at most 100 characters)")
    return name


# --- opening without following links ---------------------------------------------------------


def _link_error(path: Path) -> RunFileError:
    return RunFileError(f"run error: {path}: a symbolic link, or inside one; files of a run directory are never "
                        "followed through links (replace it with the real file or folder)")


def _os_error(path: Path, err: OSError) -> RunFileError:
    if err.errno == errno.ELOOP:
        return _link_error(path)
    if err.errno == errno.ENOENT:
        return RunFileError(f"run error: {path}: file not found")
    if err.errno == errno.ENOTDIR:
        return RunFileError(f"run error: {path}: a file where a folder was expected")
    if err.errno == errno.EISDIR:
        return RunFileError(f"run error: {path}: a folder, not a file")
    return RunFileError(f"run error: {path}: {err.strerror or err}")


def _relative(path: Path, inside: Path | None) -> tuple[Path, tuple[str, ...]]:
    path = Path(path)
    inside = path.parent if inside is None else Path(inside)
    try:
        parts = path.relative_to(inside).parts
    except ValueError:
        raise ValueError(f"{path} is not inside {inside}") from None  # a caller's bug, not an input
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{path}: not a file below {inside}")
    return inside, parts


@contextmanager
def _parent_fd(path: Path, inside: Path | None, create: bool = False) -> Iterator[tuple[int, str]]:
    """(fd of the folder holding `path`, its last component): every folder below `inside`
    opened with O_NOFOLLOW (made first when `create`)."""
    root, parts = _relative(path, inside)
    try:
        if create:
            root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise _os_error(root, err) from None
    try:
        for part in parts[:-1]:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                except OSError as err:
                    raise _os_error(path, err) from None
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | _FOLLOW_NONE, dir_fd=fd)
            except OSError as err:
                raise (_link_error(path) if err.errno in (errno.ELOOP, errno.ENOTDIR) else _os_error(path, err)) from None
            os.close(fd)
            fd = child
        yield fd, parts[-1]
    finally:
        os.close(fd)


def ensure_dir(path: Path, inside: Path | None = None) -> Path:
    """Make the folder `path` (and the folders between `inside` and it), refusing links."""
    path = Path(path)
    with _parent_fd(path / "_", inside if inside is not None else path.parent, create=True):
        pass
    return path


def is_link_free(path: Path, inside: Path) -> bool:
    """Whether nothing between `inside` and `path` (itself included) is a symbolic link."""
    try:
        _, parts = _relative(path, inside)
    except ValueError:
        return False
    here = Path(inside)
    for part in parts:
        here = here / part
        if here.is_symlink():
            return False
    return True


def refuse_links(folder: Path, inside: Path) -> None:
    """One line if `folder`, a folder between `inside` and it, or anything already in it is a
    symbolic link, or if something in it is neither a file nor a folder (a FIFO would block the
    writer forever): for writers that open files by path themselves (transformers, PEFT)."""
    folder = Path(folder)
    inner = list(folder.rglob("*")) if folder.is_dir() and not folder.is_symlink() else []
    if not is_link_free(folder, inside) or any(p.is_symlink() for p in inner):
        raise _link_error(folder)
    special = next((p for p in inner if not (p.is_file() or p.is_dir())), None)
    if special is not None:
        raise RunFileError(f"run error: {special}: neither a file nor a folder (a FIFO, socket or device); "
                           "remove it")


def open_regular(path: Path, flags: int, inside: Path | None = None, create: bool = False) -> int:
    """An fd of the regular file `path` (O_NOFOLLOW below `inside`); a link, a folder, a FIFO or
    a device is refused in one line. `create` makes the file (and its folders) if missing."""
    path = Path(path)
    with _parent_fd(path, inside, create=create) as (dir_fd, name):
        extra = os.O_CREAT if create else 0
        try:
            fd = os.open(name, flags | extra | _FOLLOW_NONE | os.O_NONBLOCK, 0o644, dir_fd=dir_fd)
        except OSError as err:
            raise _os_error(path, err) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunFileError(f"run error: {path}: not a regular file (a FIFO, device or socket)")
    os.set_blocking(fd, True)
    return fd


# --- writing ----------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes | str | Callable[[Path], None], inside: Path | None = None) -> None:
    """Write `data` (or let `data(tmp)` write) to a fresh temporary file, fsync, rename over
    `path` and fsync the folder: a crash leaves the old file or the new one. No link below
    `inside` is followed (the rename replaces a link at `path` itself, never its target). A full
    disk raises DiskFullError naming `path` (the temporary file is removed, the old file stays)."""
    path = Path(path)
    tmp_name = path.name + ".tmp"
    with _parent_fd(path, inside, create=True) as (dir_fd, name):
        try:
            _unlink(tmp_name, dir_fd)  # a leftover of a crash, or a planted link: removed, not followed
            # made here, exclusive and not through a link; then filled by path (numpy, torch and
            # shutil write to paths), and read back by fd for the fsync
            os.close(os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FOLLOW_NONE, 0o644, dir_fd=dir_fd))
            if callable(data):
                data(path.with_name(tmp_name))
            else:
                path.with_name(tmp_name).write_bytes(data.encode() if isinstance(data, str) else data)
            fd = os.open(tmp_name, os.O_RDONLY | _FOLLOW_NONE, dir_fd=dir_fd)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp_name, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        except (OSError, RuntimeError) as err:
            _unlink(tmp_name, dir_fd)
            if not _disk_full(err):
                if isinstance(err, OSError) and err.errno in (errno.ELOOP, errno.EISDIR, errno.ENOTDIR):
                    raise _os_error(path, err) from None
                raise
            raise DiskFullError(f"disk full: could not write {path} (its previous version, if any, is intact); "
                                "free some space and resume") from None


def _unlink(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise RunFileError(f"run error: a folder named {name} is in the way") from None


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


# --- reading ----------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_fd_bounded(fd: int, max_bytes: int, what: str | Path) -> bytes:
    """Up to `max_bytes` from `fd`, counted as read (chunks until max_bytes + 1): a file that
    is larger, growing, a device or a pipe is refused without reading more."""
    chunks, total = [], 0
    while True:
        chunk = os.read(fd, min(CHUNK, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise RunFileError(f"run error: {what}: more than the {max_bytes} a run file may have")


def read_up_to(fd: int, n: int) -> bytes:
    """The next `n` bytes of `fd` (fewer at its end), read in chunks: never more than asked."""
    chunks, total = [], 0
    while total < n and (chunk := os.read(fd, min(CHUNK, n - total))):
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_bounded(path: Path, max_bytes: int, inside: Path | None = None) -> bytes:
    """A run file's bytes: a regular file reached without links below `inside`, refused (one
    line) when missing or longer than `max_bytes` bytes actually read."""
    fd = open_regular(path, os.O_RDONLY, inside)
    try:
        size = os.fstat(fd).st_size  # a shortcut for the message only: the bound is the count
        if size > max_bytes:
            raise RunFileError(f"run error: {path}: {size} bytes, more than the {max_bytes} a run file may have")
        return read_fd_bounded(fd, max_bytes, path)
    finally:
        os.close(fd)


def read_user_file(path: Path, max_bytes: int, what: str) -> bytes:
    """A file the user named (a config): links followed (the user's choice), but a folder is
    refused and the bytes actually read are counted, so /dev/zero or a FIFO cannot cost more
    than `max_bytes` (opened non-blocking: a FIFO without a writer reads as empty)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{what}: {path}: is a folder, not a file") from None
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise ConfigError(f"{what}: {path}: is a folder, not a file")
        os.set_blocking(fd, True)
        try:
            return read_fd_bounded(fd, max_bytes, path)
        except RunFileError:
            raise ConfigError(f"{what}: {path}: more than a config may have ({max_bytes} bytes)") from None
    finally:
        os.close(fd)


_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def json_limits_error(data: bytes) -> str | None:
    """Why `data` may not be parsed (too many containers for its size, nested too deeply), or
    None. Counted at C speed before `json.loads` allocates anything."""
    containers = data.count(b"[") + data.count(b"{")
    if containers > len(data) // BYTES_PER_CONTAINER + 1024:
        return f"{containers} arrays and objects in {len(data)} bytes (at most one per {BYTES_PER_CONTAINER} bytes)"
    if containers:
        steps = _STRING.sub(b"", data).translate(_DEPTH_STEP, _BRACKETS)
        if steps and int(np.frombuffer(steps, np.int8).cumsum(dtype=np.int32).max()) > MAX_JSON_DEPTH:
            return f"nested more than {MAX_JSON_DEPTH} deep"
    return None


def parse_json(data: bytes | str, where: str | Path) -> Any:
    """JSON with limits on depth and containers; a damaged text is a one-line RunFileError."""
    raw = data.encode() if isinstance(data, str) else data
    problem = json_limits_error(raw)
    if problem is not None:
        raise RunFileError(f"run error: {where}: not a JSON record fedlora writes: {problem}")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise RunFileError(f"run error: {where}: not valid JSON (truncated or damaged)") from None


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES, inside: Path | None = None) -> Any:
    return parse_json(read_bounded(path, max_bytes, inside), path)


def tensors_to_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return safetensors_bytes({k: v.detach().contiguous() for k, v in tensors.items()}, metadata)


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the tensors alone (names, dtypes, shapes, values; no metadata): what a file's
    record vouches for, recomputed from the tensors read back."""
    return sha256_bytes(tensors_to_bytes(tensors))


def load_tensors(path: Path, max_bytes: int | None = None, expected_sha256: str | None = None,
                 inside: Path | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file. The header is read and checked first (its
    length, JSON limits, every tensor's extent); only then the bytes it declares, counted, so a
    garbled length or a sparse multi-gigabyte file costs what its header costs. Its SHA-256 is
    checked against `expected_sha256` if given. `max_bytes` defaults to the memory available."""
    path = Path(path)
    if max_bytes is None:
        from fedlora.memory import available_bytes

        max_bytes = available_bytes() // 2
    altered = RunFileError(f"run error: {path}: altered, truncated or replaced since it was written "
                           "(SHA-256 differs from the checkpoint's record)")
    fd = open_regular(path, os.O_RDONLY, inside)  # a link, a FIFO, a missing file: said as such
    try:
        data, header = _read_safetensors(fd, path, max_bytes)
    except RunFileError:
        if expected_sha256 is None:
            raise
        raise altered from None  # a recorded file: say what is wrong with it, not how it broke
    finally:
        os.close(fd)
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise altered
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise RunFileError(f"run error: {path}: damaged safetensors file ({err})") from None
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise RunFileError(f"run error: {path}: damaged safetensors header")
    return tensors, metadata


def _read_safetensors(fd: int, path: Path, max_bytes: int) -> tuple[bytes, dict[str, Any]]:
    """(the file's bytes, its header): the header read and checked before the data it declares."""
    head = read_up_to(fd, 8)
    if len(head) < 8:
        raise RunFileError(f"run error: {path}: truncated ({len(head)} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > max_bytes:
        raise RunFileError(f"run error: {path}: damaged or truncated (header length {n})")
    raw_header = read_up_to(fd, n)
    if len(raw_header) < n:
        raise RunFileError(f"run error: {path}: damaged or truncated (header length {n}, file "
                           f"{8 + len(raw_header)} bytes)")
    header = _checked_header(path, raw_header)
    size = max((end for _, end in _extents(path, header)), default=0)
    if 8 + n + size > max_bytes:
        raise RunFileError(f"run error: {path}: declares {8 + n + size} bytes, more than the {max_bytes} "
                           "a run file may have here")
    body = read_up_to(fd, size)
    trailing = os.read(fd, 1)
    if len(body) < size or trailing:
        raise RunFileError(f"run error: {path}: {'truncated' if len(body) < size else 'longer than its header says'} "
                           f"(its header declares {8 + n + size} bytes)")
    return head + raw_header + body, header


def _extents(path: Path, header: dict[str, Any]) -> list[tuple[int, int]]:
    """Each tensor's [begin, end) in the data, checked to be two ordered non-negative integers."""
    out = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise RunFileError(f"run error: {path}: damaged safetensors header (tensor {str(key)[:60]!r})")
        out.append((offsets[0], offsets[1]))
    return out


def _checked_header(path: Path, raw: bytes) -> dict[str, Any]:
    header = parse_json(raw, f"{path} (its header)")
    if not isinstance(header, dict):
        raise RunFileError(f"run error: {path}: damaged safetensors header")
    return header
