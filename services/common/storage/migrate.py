"""Schema migrations: numbered SQL files per dialect, applied in order, each exactly once.

Files live in ``migrations/<dialect>/NNNN_name.sql``. All pending files are applied in one
transaction that first takes the migration lock (PostgreSQL advisory lock; SQLite BEGIN
IMMEDIATE), so processes opening the same database at once apply each file exactly once.
A file's SHA-256 is recorded; an applied file that was edited afterwards is refused.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

from .db import Database, utcnow
from .errors import MigrationError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(dialect: str) -> list[Migration]:
    folder = resources.files(__package__).joinpath("migrations", dialect)
    found = []
    for entry in folder.iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if not found or versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migrations for {dialect} must be numbered 0001.. without gaps: {versions}")
    return found


def migrate(db: Database) -> list[int]:
    """Apply pending migrations; returns the versions applied by this call."""
    migrations = load_migrations(db.dialect.name)
    with db.transaction() as s:
        db.lock(s, "schema_migrations")
        s.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " checksum TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        applied = {v: c for v, c in s.all("SELECT version, checksum FROM schema_migrations")}
        done = []
        for mig in migrations:
            if mig.version in applied:
                if applied[mig.version] != mig.checksum:
                    raise MigrationError(
                        f"migration {mig.version:04d}_{mig.name} was changed after it was applied"
                    )
                continue
            s.script(mig.sql)
            s.execute(
                "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (?, ?, ?, ?)",
                (mig.version, mig.name, mig.checksum, utcnow().isoformat()),
            )
            done.append(mig.version)
    if done:
        log.info("applied schema migrations %s (%s)", done, db.dialect.name)
    return done
