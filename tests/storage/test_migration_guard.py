"""A guard on the PostgreSQL migrations written from now on: an index on a table that already
exists is built CONCURRENTLY, in a file marked ``-- biogate: no-transaction``, so that an upgrade
never holds the writes of a live table (every enrolment, verification and MFA decision is an
audited write) for as long as the build takes. The files that had shipped when the guard was
written are left as they are (an applied file may not change): README, "Upgrading a large
PostgreSQL database", says how to build their indexes beforehand."""

from __future__ import annotations

import re

import pytest

from services.common.storage.migrate import SHARED, Migration, SchemaPart, load_migrations
from services.mfa.storage import PART as MFA
from services.voice.storage import PART as VOICE

# The highest version of each part when the guard was written; every file above it is checked.
SHIPPED = {"shared": 4, "mfa": 8, "voice": 2}
PARTS = [SHARED, MFA.schema, VOICE.schema]

_COMMENT = re.compile(r"--[^\n]*")
_CREATE_TABLE = re.compile(r"\bCREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", re.IGNORECASE)
_CREATE_INDEX = re.compile(
    r"\bCREATE\s+(?:UNIQUE\s+)?INDEX\s+(CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(\w+)\s+ON\s+(?:ONLY\s+)?(\w+)",
    re.IGNORECASE,
)


def blocking_indexes(mig: Migration) -> list[str]:
    """The indexes the file builds on a table it did not create, holding the table's writers."""
    sql = _COMMENT.sub("", mig.sql)
    created = {name.lower() for name in _CREATE_TABLE.findall(sql)}
    return [f"{index} ON {table}" for concurrently, index, table in _CREATE_INDEX.findall(sql)
            if table.lower() not in created and not (concurrently and not mig.transactional)]


@pytest.mark.parametrize("part", PARTS, ids=lambda p: p.name)
def test_new_postgres_migrations_build_indexes_without_holding_writes(part: SchemaPart) -> None:
    assert part.name in SHIPPED
    for mig in load_migrations("postgres", part):
        if mig.version > SHIPPED[part.name]:
            assert not blocking_indexes(mig), (
                f"{part.name} {mig.version:04d}_{mig.name} builds {blocking_indexes(mig)} holding the table's "
                "writes: write CREATE INDEX CONCURRENTLY IF NOT EXISTS in a file of its own whose header has "
                "the line '-- biogate: no-transaction'")


def test_the_guard_tells_blocking_builds_from_online_ones() -> None:
    def check(sql: str) -> list[str]:
        return blocking_indexes(Migration(9, "x", sql))

    assert check("CREATE INDEX audit_records_x ON audit_records (seq);") == ["audit_records_x ON audit_records"]
    assert check("create unique index if not exists d_x on only devices (id);") == ["d_x ON devices"]
    assert check("CREATE INDEX CONCURRENTLY IF NOT EXISTS a_x ON audit_records (seq);") == ["a_x ON audit_records"]
    assert check("-- biogate: no-transaction\nCREATE INDEX CONCURRENTLY IF NOT EXISTS a_x ON audit_records (seq);\n"
                 "-- CREATE INDEX a_y ON audit_records (seq); in a comment\n") == []
    assert check("CREATE TABLE fresh (id INTEGER);\nCREATE INDEX fresh_id ON fresh (id);") == []
    # The shipped files do hold writes: what README tells an operator to build beforehand.
    shipped = load_migrations("postgres", SHARED)[2]
    assert blocking_indexes(shipped) == ["audit_records_key_introduced ON audit_records"]
