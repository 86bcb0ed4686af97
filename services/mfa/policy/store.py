"""Per-tenant policies, reloaded without restart when their file changes.

A tenant's policy is ``<policy_dir>/<tenant>.yaml`` if that file exists, else the default
policy. A file is looked at (stat) at most every ``check_s`` seconds; when its mtime or size
changed it is parsed again. A file that fails to parse leaves the policy that was in force
running, and the failure is logged and kept in :attr:`PolicyStore.errors`. A tenant file that has
never parsed fails closed (POLICY_INVALID) rather than falling back to the default.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from services.common import errors

from .loader import PolicyError, Problem, load_policy
from .schema import Policy

log = logging.getLogger("biogate.mfa.policy")


@dataclass
class _Entry:
    path: Path
    stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the file that was parsed
    policy: Policy | None = None
    checked: float | None = None  # monotonic time of the last stat
    error: PolicyError | None = None


class PolicyStore:
    def __init__(self, default_path: Path, policy_dir: Path | None, check_s: float = 1.0) -> None:
        self.policy_dir = policy_dir
        self.check_s = check_s
        self._lock = threading.Lock()
        self._entries: dict[Path, _Entry] = {}
        self._default = self._entry(default_path)
        self._refresh(self._default, force=True)
        if self._default.policy is None:
            assert self._default.error is not None
            raise self._default.error  # the service cannot start without its default policy

    @property
    def errors(self) -> dict[str, PolicyError]:
        return {str(e.path): e.error for e in self._entries.values() if e.error is not None}

    def _entry(self, path: Path) -> _Entry:
        entry = self._entries.get(path)
        if entry is None:
            entry = self._entries[path] = _Entry(path)
        return entry

    def get(self, tenant_id: str) -> Policy:
        with self._lock:
            entry = self._default
            if self.policy_dir is not None:
                own = self.policy_dir / f"{tenant_id}.yaml"
                if own in self._entries or own.is_file():
                    entry = self._entry(own)
            self._refresh(entry)
            if entry.policy is None:
                if entry is not self._default and not entry.path.exists():
                    entry = self._default  # the tenant's file was removed: back to the default
                    self._refresh(entry)
                else:
                    raise errors.failed_precondition(
                        f"the policy of tenant {tenant_id} is invalid and no earlier version is in force; "
                        "fix the policy file", reason="POLICY_INVALID")
            assert entry.policy is not None
            return entry.policy

    def _refresh(self, entry: _Entry, force: bool = False) -> None:
        now = time.monotonic()
        if not force and entry.checked is not None and now - entry.checked < self.check_s:
            return
        entry.checked = now
        try:
            st = entry.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == entry.stamp and not force:
            return
        if stamp is None:
            if entry.policy is None:
                entry.error = PolicyError(str(entry.path), [Problem(0, 0, "", "file not found")])
            return  # a file that vanished keeps the policy in force
        try:
            policy = load_policy(entry.path)
        except PolicyError as exc:
            entry.stamp, entry.error = stamp, exc
            log.error("policy rejected; the policy in force stays", extra={
                "policy_file": str(entry.path), "problems": [str(p) for p in exc.problems],
                "in_force": entry.policy.version if entry.policy else None})
            return
        entry.stamp, entry.policy, entry.error = stamp, policy, None
        log.info("policy loaded", extra={"policy_file": str(entry.path), "version": policy.version})
