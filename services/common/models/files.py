"""File plumbing of the model cache: hashing, atomic replacement, and the verified-stamp that lets a
second `models fetch` skip re-hashing files that have not changed since they were verified."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

STAMP_NAME = ".verified.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def temp_path(directory: Path, name: str) -> Path:
    """A fresh, empty file beside its destination, so that os.replace is atomic."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=directory)
    os.close(fd)
    return Path(tmp)


def commit(tmp: Path, dest: Path, mode: int = 0o444) -> None:
    """fsync ``tmp`` and move it over ``dest`` in one step; readers see the old file or the new one."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, dest)
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def atomic_output(dest: Path, mode: int = 0o444) -> Iterator[Path]:
    """Yield a temporary path; if the block succeeds it replaces ``dest``, otherwise it is removed."""
    tmp = temp_path(dest.parent, dest.name)
    try:
        yield tmp
        commit(tmp, dest, mode)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(dest: Path, text: str, mode: int = 0o644) -> None:
    with atomic_output(dest, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")


class VerifiedStamps:
    """Per model directory: file name -> (size, mtime_ns, sha256) as last hashed.

    A file whose size and mtime still match its stamp is taken to have that sha256 without reading
    it. A rewrite in place changes mtime, so a corrupted file is hashed again; `verify` ignores
    the stamps and hashes everything.
    """

    def __init__(self, directory: Path):
        self._path = directory / STAMP_NAME
        self._data = self._read()

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self) -> None:
        # A service may run with a read-only cache: it then hashes on each start, nothing worse.
        with contextlib.suppress(OSError):
            write_text_atomic(self._path, json.dumps(self._data, indent=1, sort_keys=True))

    def known_sha256(self, name: str, path: Path) -> str | None:
        entry = self._data.get(name)
        if not entry:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        if entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            return entry.get("sha256")
        return None

    # Both re-read the file first: another VerifiedStamps of the same directory may have written it.
    def record(self, name: str, path: Path, sha256: str) -> None:
        st = path.stat()
        self._data = self._read()
        self._data[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
        self._write()

    def forget(self, name: str) -> None:
        self._data = self._read()
        if self._data.pop(name, None) is not None:
            self._write()
