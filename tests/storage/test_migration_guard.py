"""A guard on the PostgreSQL migrations written from now on: no statement holds the reads or writes
of a table that already exists for as long as it takes to read, rewrite or index the table
(every enrolment, verification and MFA decision is an audited write). An index on such a table is
built CONCURRENTLY, in a file marked ``-- biogate: no-transaction``; a constraint is added NOT
VALID and validated in a later file; and so on, one rule each below, with the reason and the safe
form in its message. A table created in the same file is empty: what the file does to it is
exempt. The files that had shipped when the guard was written are left as they are (an applied
file may not change): README, "Upgrading a large PostgreSQL database", says how to build their
indexes beforehand."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from services.common.storage.migrate import SHARED, Migration, SchemaPart, load_migrations, statements
from services.mfa.storage import PART as MFA
from services.voice.storage import PART as VOICE

# The highest version of each part when the guard was written; every file above it is checked.
SHIPPED = {"shared": 4, "mfa": 8, "voice": 2}
PARTS = [SHARED, MFA.schema, VOICE.schema]

ONLINE = "in a file of its own whose header has the line '-- biogate: no-transaction'"
_I = re.IGNORECASE | re.DOTALL
_DOLLAR_QUOTED = re.compile(r"\$(\w*)\$.*?\$\1\$", re.DOTALL)
_LITERAL = re.compile(r"'(?:[^']|'')*'")
_CREATE_TABLE = re.compile(r"^CREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", _I)
_CREATE_INDEX = re.compile(
    r"^CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(\w+)\s+ON\s+(?:ONLY\s+)?(\w+)", _I)
_ALTER_TABLE = re.compile(r"^(ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?(\w+))\s+(.*)$", _I)
_NOT_VALID_NOT_NULL = re.compile(
    r"^ALTER\s+TABLE\s+(?:ONLY\s+)?(\w+)\s+ADD\s+CONSTRAINT\s+(\w+)\s+CHECK\s*\(\s*(\w+)\s+IS\s+NOT\s+NULL\s*\)"
    r"\s+NOT\s+VALID$", _I)
_VALIDATE = re.compile(r"^ALTER\s+TABLE\s+(?:ONLY\s+)?(\w+)\s+VALIDATE\s+CONSTRAINT\s+(\w+)$", _I)
_ADDED_NOT_VALID = re.compile(r"^ALTER\s+TABLE\s+(?:ONLY\s+)?(\w+)\s+ADD\s+CONSTRAINT\s+(\w+)\s.*\bNOT\s+VALID$", _I)


@dataclass
class Context:
    """What the file (and the part's files before it) did before the statement at hand."""

    transactional: bool
    created: set[str] = field(default_factory=set)  # tables created in the file, and indexes on them
    added_not_valid: set[tuple[str, str]] = field(default_factory=set)  # (table, constraint) in the file
    not_null_checks: dict[tuple[str, str], str] = field(default_factory=dict)  # (table, constraint): column
    proven_not_null: set[tuple[str, str]] = field(default_factory=set)  # (table, column) by a valid check


def _fresh(m: re.Match[str], ctx: Context) -> bool:
    return all(name.strip().lower() in ctx.created for name in m.group("target").split(","))


def _never(m: re.Match[str], ctx: Context) -> bool:
    return False


def _validated_elsewhere(m: re.Match[str], ctx: Context) -> bool:
    return _fresh(m, ctx) or (m.group("target").lower(), m.group("name").lower()) not in ctx.added_not_valid


def _proven(m: re.Match[str], ctx: Context) -> bool:
    return _fresh(m, ctx) or (m.group("target").lower(), m.group("column").lower()) in ctx.proven_not_null


@dataclass(frozen=True)
class Rule:
    """A statement (or one action of an ALTER TABLE) that ``pattern`` finds holds its table; it
    passes where ``exempt`` says (by default: the table, or index, was created in the same file)."""

    name: str
    pattern: re.Pattern[str]
    reason: str
    instead: str
    exempt: Callable[[re.Match[str], Context], bool] = _fresh
    in_transaction_only: bool = False


_ALTER = r"^ALTER\s+TABLE\s+(?P<target>\w+)\s+"
_ADD_COLUMN = r"ADD\s+(?:COLUMN\s+)?(?:IF\s+NOT\s+EXISTS\s+)?(?!(?:CONSTRAINT|CHECK|FOREIGN|PRIMARY|UNIQUE|EXCLUDE)\b)\w+\s"
_VOLATILE = r"(?:random|clock_timestamp|timeofday|gen_random_uuid|uuid_generate_v\w+|nextval|txid_current)"

RULES = [
    Rule("CREATE INDEX", re.compile(
        r"^CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?!CONCURRENTLY\b)(?:IF\s+NOT\s+EXISTS\s+)?(?:(?!ON\b)\w+\s+)?ON\s+"
        r"(?:ONLY\s+)?(?P<target>\w+)", _I),
         "its SHARE lock holds every INSERT, UPDATE and DELETE on the table until the index is built",
         f"CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS, {ONLINE}"),
    Rule("CONCURRENTLY in a transaction", re.compile(
        r"^(?:CREATE\s+(?:UNIQUE\s+)?INDEX|DROP\s+INDEX|REINDEX\s+\w+)\s+CONCURRENTLY\b", _I),
         "PostgreSQL refuses it inside a transaction block, and this file runs in one",
         f"the same statement {ONLINE}", exempt=_never, in_transaction_only=True),
    Rule("DROP INDEX", re.compile(
        r"^DROP\s+INDEX\s+(?!CONCURRENTLY\b)(?:IF\s+EXISTS\s+)?(?P<target>\w+(?:\s*,\s*\w+)*)", _I),
         "its ACCESS EXCLUSIVE lock on the table waits behind every query on it, and every query after "
         "it waits behind it",
         f"DROP INDEX CONCURRENTLY IF EXISTS, one index a statement, {ONLINE}"),
    Rule("REINDEX", re.compile(r"^REINDEX\b.*?(?P<target>\w+)$", _I),
         "without CONCURRENTLY it holds the table's writes (and the reads that use the index) while it "
         "builds; REINDEX CONCURRENTLY runs in no transaction, and one that fails leaves an INVALID "
         "<index>_ccnew behind that a run again does not drop",
         f"CREATE INDEX CONCURRENTLY IF NOT EXISTS a replacement under a new name, then DROP INDEX "
         f"CONCURRENTLY IF EXISTS the old one, {ONLINE}"),
    Rule("ADD CONSTRAINT CHECK / FOREIGN KEY", re.compile(
        _ALTER + r"ADD\s+(?:CONSTRAINT\s+\w+\s+)?(?:CHECK|FOREIGN\s+KEY)\b(?!.*\bNOT\s+VALID$)", _I),
         "it reads every row to validate the constraint, holding the table (CHECK: ACCESS EXCLUSIVE; "
         "FOREIGN KEY: SHARE ROW EXCLUSIVE, on both tables: no writes) until the file commits",
         "ADD CONSTRAINT ... NOT VALID, then ALTER TABLE ... VALIDATE CONSTRAINT in a later file (it lets "
         "reads and writes through)"),
    Rule("VALIDATE CONSTRAINT added in the same file", re.compile(
        _ALTER + r"VALIDATE\s+CONSTRAINT\s+(?P<name>\w+)$", _I),
         "the ADD CONSTRAINT ... NOT VALID before it holds an ACCESS EXCLUSIVE lock until the file "
         "commits, so the validation reads every row under it",
         "VALIDATE CONSTRAINT in a later file than the one that adds it", exempt=_validated_elsewhere),
    Rule("ADD PRIMARY KEY / UNIQUE", re.compile(
        _ALTER + r"ADD\s+(?:CONSTRAINT\s+\w+\s+)?(?:PRIMARY\s+KEY|UNIQUE)\s*\(", _I),
         "it builds its index under an ACCESS EXCLUSIVE lock: no reads or writes until it is built",
         f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {ONLINE}, then ADD CONSTRAINT ... UNIQUE (or "
         "PRIMARY KEY) USING INDEX in a later file"),
    Rule("ADD COLUMN with CHECK / REFERENCES", re.compile(
        _ALTER + _ADD_COLUMN + r".*\b(?:CHECK|REFERENCES)\b", _I),
         "the constraint is checked on every row under the ACCESS EXCLUSIVE lock of the ALTER TABLE",
         "ADD COLUMN without it, then ADD CONSTRAINT ... NOT VALID and VALIDATE CONSTRAINT in a later file"),
    Rule("ADD COLUMN computed per row", re.compile(
        _ALTER + _ADD_COLUMN + r"\s*(?:(?:small|big)?serial\b|.*\bGENERATED\b|"
        rf".*\bDEFAULT\b.*\b{_VOLATILE}\s*\()", _I),
         "a volatile DEFAULT (or SERIAL, IDENTITY, GENERATED ... STORED) is computed for every row: the "
         "table is rewritten under an ACCESS EXCLUSIVE lock (a constant or now() is stored once, rows "
         "untouched)",
         "ADD COLUMN with no DEFAULT or a constant one, fill it in batches, then ALTER COLUMN ... SET DEFAULT"),
    Rule("ALTER COLUMN TYPE", re.compile(_ALTER + r"ALTER\s+(?:COLUMN\s+)?\w+\s+(?:SET\s+DATA\s+)?TYPE\b", _I),
         "it rewrites the table and rebuilds its indexes under an ACCESS EXCLUSIVE lock (but for a few "
         "binary-compatible changes)",
         "ADD COLUMN of the new type, fill it in batches, and switch the code to it in a later release"),
    Rule("SET NOT NULL", re.compile(_ALTER + r"ALTER\s+(?:COLUMN\s+)?(?P<column>\w+)\s+SET\s+NOT\s+NULL$", _I),
         "it reads every row to prove it, under an ACCESS EXCLUSIVE lock",
         "ADD CONSTRAINT <c> CHECK (<column> IS NOT NULL) NOT VALID, VALIDATE CONSTRAINT <c> in a later "
         "file, and SET NOT NULL after it (PostgreSQL then reads no row; DROP CONSTRAINT <c> after)",
         exempt=_proven),
    Rule("CLUSTER", re.compile(r"^CLUSTER\b(?:\s+VERBOSE)?\s*(?P<target>\w*)", _I),
         "it rewrites the table under an ACCESS EXCLUSIVE lock: no reads or writes until it is done",
         "no CLUSTER in a migration: reorder a table online outside the upgrade (pg_repack), if at all"),
    Rule("VACUUM FULL", re.compile(r"^VACUUM\s*(?:\([^)]*\bFULL\b[^)]*\)|\s+FULL\b)", _I),
         "it rewrites the table under an ACCESS EXCLUSIVE lock: no reads or writes until it is done",
         "no VACUUM in a migration: autovacuum keeps the tables; reclaim space online outside the "
         "upgrade (pg_repack), if at all", exempt=_never),
    Rule("LOCK TABLE", re.compile(r"^LOCK\s+(?:TABLE\s+)?(?:ONLY\s+)?(?P<target>\w+(?:\s*,\s*\w+)*)", _I),
         "it holds the lock (ACCESS EXCLUSIVE unless it names another mode) until the file commits: "
         "every query on the table waits for the whole migration",
         "no LOCK: the migration lock keeps migrators apart, and each statement takes the lock it needs"),
]


def _actions(stmt: str) -> list[str]:
    """An ALTER TABLE as one ``ALTER TABLE <table> <action>`` per action (split at the commas
    outside parentheses and quotes); any other statement as it is."""
    m = _ALTER_TABLE.match(stmt)
    if m is None:
        return [stmt]
    found, action, depth, quote = [], "", 0, ""
    for c in m.group(3):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "()":
            depth += 1 if c == "(" else -1
        elif c == "," and depth == 0:
            found.append(action.strip())
            action = ""
            continue
        action += c
    return [f"ALTER TABLE {m.group(2)} {a}" for a in [*found, action.strip()]]


def _learn(ctx: Context, stmt: str) -> None:
    """What ``stmt`` tells the rules about the statements after it."""
    if m := _CREATE_TABLE.match(stmt):
        ctx.created.add(m.group(1).lower())
    elif (m := _CREATE_INDEX.match(stmt)) and m.group(2).lower() in ctx.created:
        ctx.created.add(m.group(1).lower())
    if m := _ADDED_NOT_VALID.match(stmt):
        ctx.added_not_valid.add((m.group(1).lower(), m.group(2).lower()))
    if m := _NOT_VALID_NOT_NULL.match(stmt):
        ctx.not_null_checks[m.group(1).lower(), m.group(2).lower()] = m.group(3).lower()
    if (m := _VALIDATE.match(stmt)) and (key := (m.group(1).lower(), m.group(2).lower())) in ctx.not_null_checks:
        ctx.proven_not_null.add((key[0], ctx.not_null_checks[key]))


def _statements(mig: Migration) -> list[str]:
    return [a for stmt in statements(_DOLLAR_QUOTED.sub("''", mig.sql)) for a in _actions(stmt)]


def holding_statements(mig: Migration, earlier: Sequence[Migration] = ()) -> list[str]:
    """What the file does that holds a table it did not create, one line each: the rule, the
    statement, why, and what to write instead. ``earlier``: the part's files before it."""
    ctx = Context(mig.transactional)
    for before in earlier:
        for stmt in _statements(before):
            _learn(ctx, stmt)
        ctx.created.clear()
        ctx.added_not_valid.clear()
    found = []
    for stmt in _statements(mig):
        bare = _LITERAL.sub("''", stmt)
        for rule in RULES:
            m = rule.pattern.search(bare)
            if m and not (rule.in_transaction_only and not ctx.transactional) and not rule.exempt(m, ctx):
                found.append(f"{rule.name}: {' '.join(stmt.split())[:100]!r}: {rule.reason}; "
                             f"instead: {rule.instead}")
        _learn(ctx, stmt)
    return found


@pytest.mark.parametrize("part", PARTS, ids=lambda p: p.name)
def test_new_postgres_migrations_do_not_hold_existing_tables(part: SchemaPart) -> None:
    assert part.name in SHIPPED
    migrations = load_migrations("postgres", part)
    for i, mig in enumerate(migrations):
        found = holding_statements(mig, migrations[:i])
        if mig.version > SHIPPED[part.name]:
            assert not found, f"{part.name} {mig.version:04d}_{mig.name}:\n" + "\n".join(found)


def fired(sql: str, *earlier: str) -> list[str]:
    befores = [Migration(i + 1, "before", e) for i, e in enumerate(earlier)]
    return [f.split(":")[0] for f in holding_statements(Migration(len(earlier) + 1, "x", sql), befores)]


ONLINE_FILE = "-- biogate: no-transaction\n"

# (the rule, a statement it fires on, the safe form that passes)
CASES = [
    ("CREATE INDEX", "CREATE INDEX a_x ON audit_records (seq);",
     ONLINE_FILE + "CREATE INDEX CONCURRENTLY IF NOT EXISTS a_x ON audit_records (seq);"),
    ("CREATE INDEX", "create unique index if not exists d_x on only devices (id);",
     ONLINE_FILE + "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS d_x ON devices (id);"),
    ("CREATE INDEX", "CREATE INDEX ON devices (id);",
     ONLINE_FILE + "CREATE INDEX CONCURRENTLY IF NOT EXISTS d_id ON devices (id);"),
    ("CONCURRENTLY in a transaction", "CREATE INDEX CONCURRENTLY IF NOT EXISTS a_x ON audit_records (seq);",
     ONLINE_FILE + "CREATE INDEX CONCURRENTLY IF NOT EXISTS a_x ON audit_records (seq);"),
    ("DROP INDEX", "DROP INDEX IF EXISTS devices_subject;",
     ONLINE_FILE + "DROP INDEX CONCURRENTLY IF EXISTS devices_subject;"),
    ("REINDEX", "REINDEX INDEX devices_subject;",
     ONLINE_FILE + "CREATE INDEX CONCURRENTLY IF NOT EXISTS devices_subject2 ON devices (tenant_id, subject_id);\n"
     "DROP INDEX CONCURRENTLY IF EXISTS devices_subject;"),
    ("ADD CONSTRAINT CHECK / FOREIGN KEY", "ALTER TABLE devices ADD CONSTRAINT c CHECK (sign_count >= 0);",
     "ALTER TABLE devices ADD CONSTRAINT c CHECK (sign_count >= 0) NOT VALID;"),
    ("ADD CONSTRAINT CHECK / FOREIGN KEY",
     "ALTER TABLE devices ADD COLUMN n INTEGER, ADD FOREIGN KEY (n) REFERENCES tenants (id);",
     "ALTER TABLE devices ADD COLUMN n INTEGER, ADD FOREIGN KEY (n) REFERENCES tenants (id) NOT VALID;"),
    ("VALIDATE CONSTRAINT added in the same file",
     "ALTER TABLE devices ADD CONSTRAINT c CHECK (sign_count >= 0) NOT VALID;\n"
     "ALTER TABLE devices VALIDATE CONSTRAINT c;",
     "ALTER TABLE devices VALIDATE CONSTRAINT c;"),
    ("ADD PRIMARY KEY / UNIQUE", "ALTER TABLE devices ADD CONSTRAINT d_u UNIQUE (tenant_id, id);",
     "ALTER TABLE devices ADD CONSTRAINT d_u UNIQUE USING INDEX d_u;"),
    ("ADD COLUMN with CHECK / REFERENCES", "ALTER TABLE devices ADD COLUMN n INTEGER NOT NULL DEFAULT 0 CHECK (n >= 0);",
     "ALTER TABLE devices ADD COLUMN n INTEGER NOT NULL DEFAULT 0;"),
    ("ADD COLUMN computed per row", "ALTER TABLE devices ADD COLUMN u UUID DEFAULT gen_random_uuid();",
     "ALTER TABLE devices ADD COLUMN u UUID;"),
    ("ADD COLUMN computed per row", "ALTER TABLE devices ADD COLUMN n BIGSERIAL;",
     "ALTER TABLE devices ADD COLUMN n BIGINT;"),
    ("ADD COLUMN computed per row", "ALTER TABLE devices ADD COLUMN n BIGINT GENERATED ALWAYS AS IDENTITY;",
     "ALTER TABLE devices ADD COLUMN at TIMESTAMPTZ NOT NULL DEFAULT now(), ADD COLUMN s TEXT DEFAULT 'random(), (';"),
    ("ALTER COLUMN TYPE", "ALTER TABLE devices ALTER COLUMN sign_count TYPE NUMERIC;",
     "ALTER TABLE devices ADD COLUMN sign_count_n NUMERIC;"),
    ("ALTER COLUMN TYPE", "ALTER TABLE devices ALTER sign_count SET DATA TYPE NUMERIC;",
     "ALTER TABLE devices ALTER COLUMN sign_count SET DEFAULT 0;"),
    ("SET NOT NULL", "ALTER TABLE devices ALTER COLUMN push_token SET NOT NULL;",
     "ALTER TABLE devices ALTER COLUMN push_token SET NOT NULL, DROP CONSTRAINT d_pt;"),
    ("CLUSTER", "CLUSTER devices USING devices_subject;", "ANALYZE devices;"),
    ("VACUUM FULL", "VACUUM FULL devices;", "ANALYZE devices;"),
    ("VACUUM FULL", "VACUUM (FULL, ANALYZE) devices;", "ANALYZE devices;"),
    ("LOCK TABLE", "LOCK TABLE devices IN SHARE MODE;", "UPDATE devices SET flagged_at = NULL WHERE id = 'x';"),
]
# What the safe form of SET NOT NULL needs first: the NOT VALID check, validated in a file after it.
PROVEN = ("ALTER TABLE devices ADD CONSTRAINT d_pt CHECK (push_token IS NOT NULL) NOT VALID;",
          "ALTER TABLE devices VALIDATE CONSTRAINT d_pt;")


@pytest.mark.parametrize(("rule", "holding", "safe"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_rule_fires_on_its_holding_form_and_passes_its_safe_form(rule: str, holding: str, safe: str) -> None:
    assert rule in {r.name for r in RULES}
    assert fired(holding) == [rule]
    assert fired(safe, *PROVEN) == []


def test_the_messages_say_why_and_what_to_write_instead() -> None:
    (message,) = holding_statements(Migration(9, "x", "DROP INDEX devices_subject;"))
    assert message.startswith("DROP INDEX: 'DROP INDEX devices_subject': its ACCESS EXCLUSIVE lock")
    assert message.endswith("instead: DROP INDEX CONCURRENTLY IF EXISTS, one index a statement, in a file of its "
                            "own whose header has the line '-- biogate: no-transaction'")


def test_what_a_file_does_to_a_table_it_creates_is_exempt() -> None:
    fresh = ("CREATE TABLE fresh (id INTEGER, v INTEGER, w TEXT);\n"
             "CREATE INDEX fresh_id ON fresh (id);\nCREATE UNIQUE INDEX fresh_v ON fresh (v);\n"
             "ALTER TABLE fresh ADD CONSTRAINT fresh_w CHECK (w <> ''), ALTER COLUMN v TYPE BIGINT,"
             " ALTER COLUMN v SET NOT NULL, ADD COLUMN n BIGSERIAL;\n"
             "ALTER TABLE fresh ADD CONSTRAINT fresh_u CHECK (v > 0) NOT VALID;\n"
             "ALTER TABLE fresh VALIDATE CONSTRAINT fresh_u;\n"
             "DROP INDEX fresh_id;\nREINDEX TABLE fresh;\nLOCK TABLE fresh;\nCLUSTER fresh USING fresh_v;\n")
    assert fired(fresh) == []
    # ... but not what it does to a table that exists, nor to the index of one.
    more = "DROP INDEX fresh_v, devices_subject;\nLOCK TABLE fresh, devices;"
    assert fired(fresh + more) == ["DROP INDEX", "LOCK TABLE"]


def test_set_not_null_needs_a_validated_check_before_it() -> None:
    set_not_null = "ALTER TABLE devices ALTER COLUMN push_token SET NOT NULL;"
    assert fired(set_not_null, PROVEN[0]) == ["SET NOT NULL"]  # added, not validated
    assert fired(set_not_null, *PROVEN) == []
    assert fired(PROVEN[1] + "\n" + set_not_null, PROVEN[0]) == []  # validated in the file itself, before it
    # Validated in the file that adds it, under the ADD's lock: that is what fires.
    assert fired("\n".join([*PROVEN, set_not_null])) == ["VALIDATE CONSTRAINT added in the same file"]
    other = "ALTER TABLE devices ADD CONSTRAINT d_k CHECK (kind IS NOT NULL) NOT VALID;"
    assert fired(set_not_null, other, "ALTER TABLE devices VALIDATE CONSTRAINT d_k;") == ["SET NOT NULL"]


def test_comments_and_function_bodies_are_not_statements() -> None:
    assert fired("-- CREATE INDEX a_y ON audit_records (seq); in a comment\n"
                 "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN LOCK TABLE devices; END $$;") == []


def test_the_guard_reads_every_shipped_file_and_finds_what_readme_warns_of() -> None:
    """Below the versions it checks, what the guard finds is what README, "Upgrading a large
    PostgreSQL database", tells an operator about."""
    found: dict[str, list[str]] = {}
    for part in PARTS:
        migrations = load_migrations("postgres", part)
        for i, mig in enumerate(migrations):
            for f in holding_statements(mig, migrations[:i]):
                found.setdefault(f"{part.name} {mig.version}", []).append(f.split(":")[0])
    assert found["shared 3"] == ["CREATE INDEX"]  # audit_records_key_introduced
    assert found["shared 4"] == ["DROP INDEX", "CREATE INDEX"] * 2
    assert found["mfa 3"] == ["ADD COLUMN with CHECK / REFERENCES"] * 2 + ["CREATE INDEX"]
    assert "ADD CONSTRAINT CHECK / FOREIGN KEY" in found["mfa 4"]
    assert found["voice 2"] == ["DROP INDEX", "CREATE INDEX"]
