"""Folders and files holding secrets or personal data (the data directory, the SQLite database and
its WAL and shared-memory files): created readable by the service's own user only, and tightened
when an earlier version left them open to others."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("biogate.files")


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _tighten(path, 0o700)
    return path


def private_file(path: Path) -> Path:
    """``path``, created empty with mode 0600 if it does not exist."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        _tighten(path, 0o600)
    return path


def _tighten(path: Path, mode: int) -> None:
    st = path.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        log.warning("was readable by others; tightened", extra={"path": str(path), "mode": oct(mode)})
        os.chmod(path, mode)
