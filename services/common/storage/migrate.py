"""Schema migrations: numbered SQL files per schema part and dialect, applied in order, each once.

The shared tables (this package) and each service's own tables (a :class:`SchemaPart` the service
attaches to the storage) have their own files, ``<package>/migrations/<dialect>/NNNN_name.sql``
numbered 0001.. without gaps, recorded in ``schema_versions`` by (part, version) with the file's
SHA-256; an applied file that was edited afterwards is refused. A part's pending files are applied
in one transaction that first takes the migration lock (PostgreSQL advisory lock; SQLite BEGIN
IMMEDIATE), so processes opening the same database at once apply each file exactly once.

Databases created before the schema was split into parts recorded one history of one set of files
in ``schema_migrations``. A file whose header has the line ``-- legacy: NNNN_name`` holds (part
of) what that old migration created: where the old history records it, the file is recorded as
applied without running.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

from .db import Database, Session, utcnow
from .errors import MigrationError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LEGACY = re.compile(r"^-- legacy: (\d{4})_([a-z0-9_]+)\s*$", re.MULTILINE)
HISTORY = "schema_versions"
LEGACY_HISTORY = "schema_migrations"


@dataclass(frozen=True)
class SchemaPart:
    """A set of tables with its own migrations: ``name`` in the history, ``package`` holding
    ``migrations/<dialect>/``."""

    name: str
    package: str


SHARED = SchemaPart("shared", __package__)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def legacy(self) -> tuple[int, str] | None:
        m = _LEGACY.search(self.sql)
        return (int(m.group(1)), m.group(2)) if m else None


def load_migrations(dialect: str, part: SchemaPart = SHARED) -> list[Migration]:
    folder = resources.files(part.package).joinpath("migrations", dialect)
    found = []
    for entry in folder.iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if not found or versions != list(range(1, len(found) + 1)):
        raise MigrationError(
            f"{part.name} migrations for {dialect} must be numbered 0001.. without gaps: {versions}"
        )
    return found


def _legacy_history(db: Database, s: Session) -> set[tuple[int, str]]:
    if not db.has_table(s, LEGACY_HISTORY):
        return set()
    return {(int(v), str(n)) for v, n in s.all(f"SELECT version, name FROM {LEGACY_HISTORY}")}


def migrate(db: Database, part: SchemaPart = SHARED) -> list[int]:
    """Apply the part's pending migrations; returns the versions applied (or adopted) by this call."""
    migrations = load_migrations(db.dialect.name, part)
    with db.transaction() as s:
        db.lock(s, HISTORY)
        s.execute(
            f"CREATE TABLE IF NOT EXISTS {HISTORY} ("
            " part TEXT NOT NULL, version INTEGER NOT NULL, name TEXT NOT NULL,"
            " checksum TEXT NOT NULL, applied_at TEXT NOT NULL, PRIMARY KEY (part, version))"
        )
        applied = dict(s.all(f"SELECT version, checksum FROM {HISTORY} WHERE part = ?", (part.name,)))
        legacy: set[tuple[int, str]] | None = None
        done, adopted = [], []
        for mig in migrations:
            if mig.version in applied:
                if applied[mig.version] != mig.checksum:
                    raise MigrationError(
                        f"{part.name} migration {mig.version:04d}_{mig.name} was changed after it was applied"
                    )
                continue
            if mig.legacy is not None:
                legacy = _legacy_history(db, s) if legacy is None else legacy
            if legacy and mig.legacy in legacy:
                adopted.append(mig.version)
            else:
                s.script(mig.sql)
            s.execute(
                f"INSERT INTO {HISTORY} (part, version, name, checksum, applied_at) VALUES (?, ?, ?, ?, ?)",
                (part.name, mig.version, mig.name, mig.checksum, utcnow().isoformat()),
            )
            done.append(mig.version)
    if done:
        log.info("schema migrations of %s: %s (recorded from the legacy history: %s; %s)",
                 part.name, done, adopted, db.dialect.name)
    return done
