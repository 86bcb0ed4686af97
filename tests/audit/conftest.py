"""Audit fixtures: a real storage (SQLite file or a fresh PostgreSQL schema, via the shared
``storage_dsn`` fixture), a signing key, and raw database access for playing the attacker."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from services.common.audit import AuditLog, AuditSigner
from services.common.audit.chain import record_hash
from services.common.privacy import Pseudonymizer
from services.common.storage import open_storage

PSEUDONYM_KEY = b"p" * 32


class Attacker:
    """Someone with write access to the database, bypassing the append-only triggers."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.sqlite = dsn.startswith("sqlite:///")

    def execute(self, sql: str, params: tuple = ()) -> None:
        if self.sqlite:
            conn = sqlite3.connect(self.dsn[len("sqlite:///") :])
            try:
                conn.execute("DROP TRIGGER IF EXISTS audit_records_no_update")
                conn.execute("DROP TRIGGER IF EXISTS audit_records_no_delete")
                conn.execute(sql, params)
                conn.commit()
            finally:
                conn.close()
        else:
            with psycopg.connect(self.dsn, autocommit=True) as pg:
                pg.execute("SET session_replication_role = replica")  # no triggers, no FKs
                pg.execute(sql.replace("?", "%s"), params)

    def forge(self, storage, event_type: str, actor: str, tenant_id: str | None, pseudonym: str | None,
              details: str) -> tuple[int, str, datetime]:
        """A record chained correctly after the last one (SHA-256 needs no key): (seq, hash, ts)."""
        last = storage.audit.last()
        seq, ts = last.seq + 1, last.ts + timedelta(microseconds=1)
        h = record_hash(seq, ts, event_type, actor, tenant_id, pseudonym, details, last.hash)
        self.execute(
            "INSERT INTO audit_records (seq, ts, event_type, actor, tenant_id, subject_pseudonym, details, prev_hash,"
            " hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, self.ts(ts), event_type, actor, tenant_id, pseudonym, details, last.hash, h))
        return seq, h, ts

    def ts(self, dt: datetime):
        """A timestamp value as the column stores it."""
        return dt.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f+00:00") if self.sqlite else dt


@pytest.fixture
def storage(storage_dsn):
    st = open_storage(storage_dsn)
    yield st
    st.close()


@pytest.fixture
def attacker(storage_dsn) -> Attacker:
    return Attacker(storage_dsn)


@pytest.fixture
def signer(tmp_path) -> AuditSigner:
    return AuditSigner.load_or_create(tmp_path / "keys" / "audit-ed25519.pem")


@pytest.fixture
def audit_log(storage, signer, pseudonymizer) -> AuditLog:
    return AuditLog(storage.audit, signer, pseudonymizer, checkpoint_every=5)


@pytest.fixture
def pseudonymizer() -> Pseudonymizer:
    return Pseudonymizer(PSEUDONYM_KEY)


@pytest.fixture
def fill():
    return _fill


def _fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append(
            "face.verify" if i % 2 else "voice.enroll",
            actor="teller-app",
            tenant_id="bank-a",
            subject_id=f"cust-{i % 4}",
            details={"decision": "accept" if i % 3 else "reject", "score": round(0.5 + i / 100, 4), "n": i},
        )
