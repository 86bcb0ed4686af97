"""Deleting rows past their retention in bounded batches (storage limitation: GDPR art. 5(1)(e)).

Each storage part says which of its rows are past their use (:class:`Expiry`); :func:`purge`
deletes them ``batch`` rows per transaction, so that millions of rows never hold one long
transaction, nor the tables the services write (on SQLite the single write lock) for longer than
a batch. Each batch resumes after the last row the one before it chose (keyset paging on
``order, key``), so the rows the predicate keeps (a session under a pending review) are walked
once per purge, not once per batch. `biogate purge` (services/commands/retention.py) runs it on a
schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .db import Database, Session


@dataclass(frozen=True)
class Expiry:
    """The rows of ``table`` that ``where`` selects (``?`` bound to ``params``) are past their
    retention; ``key`` (columns, comma-separated) identifies a row. ``where`` may refer to the table by its name.
    ``order`` is the column ``where`` bounds (``expires_at <= ?``): the batches walk an index on
    ``(order, key)`` (SQLite: ``order`` alone, which holds the rowid) from the oldest row on; empty,
    they walk the key alone. ``where`` must exclude rows whose ``order`` is NULL."""

    kind: str
    table: str
    where: str
    params: Sequence[Any] = ()
    key: str = "id"
    order: str = ""


class PurgeFailed(RuntimeError):
    """A batch failed; ``deleted`` holds what the batches before it deleted (committed)."""

    def __init__(self, deleted: dict[str, int], cause: BaseException) -> None:
        super().__init__(f"the purge stopped after deleting {sum(deleted.values())} row(s): {cause}")
        self.deleted = deleted


def purge(db: Database, expiries: Iterable[Expiry], batch: int,
          on_batch: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Delete every row each expiry selects, at most ``batch`` per transaction; -> rows deleted per
    kind. ``on_batch(kind, rows)`` runs after each batch has committed."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    deleted: dict[str, int] = {}
    for e in expiries:
        deleted[e.kind] = 0
        pages = Pages(e, db.dialect.name)
        last: tuple[Any, ...] = ()
        while True:
            try:
                with db.transaction() as s:
                    chosen = pages.choose(s, last, batch)
                    n = pages.delete(s, chosen)
            except Exception as exc:
                raise PurgeFailed(deleted, exc) from exc
            deleted[e.kind] += n
            if on_batch is not None and n:
                on_batch(e.kind, n)
            if len(chosen) < batch:
                break
            last = chosen[-1]
    return deleted


class Pages:
    """The statements that page through one expiry's rows by (``order``, key) values."""

    # Bound values per DELETE: under SQLite's default limit of 32,766.
    KEYS_PER_STATEMENT = 30_000

    def __init__(self, e: Expiry, dialect: str) -> None:
        self.e = e
        # SQLite's rowid breaks ties: an index on ``order`` holds it, and it follows the table's
        # pages, where a random key (uuid) would scatter a batch of equal expiries over all of them.
        self.key = "rowid" if dialect == "sqlite" else e.key
        self.width = self.key.count(",") + 1
        self.row = f"({', '.join('?' * self.width)})"
        cols = f"{e.order}, {self.key}" if e.order else self.key
        pick = f"SELECT {cols} FROM {e.table} WHERE {e.where}{{after}} ORDER BY {{by}} LIMIT ?"
        self.first = pick.format(after="", by=cols)
        # After a row, in two seeks: the rest of its ``order`` value, then the values after it.
        # SQLite seeks ``(order, key) > (?, ?)`` by ``order`` alone: every row of a tie (a backlog
        # of sessions with one expiry) would be walked again in each batch.
        self.tie = pick.format(after=f" AND {e.order} = ? AND ({self.key}) > {self.row}" if e.order
                               else f" AND ({self.key}) > {self.row}", by=self.key)
        self.beyond = pick.format(after=f" AND {e.order} > ?", by=cols) if e.order else ""

    def queries(self) -> list[str]:
        return [q for q in (self.first, self.tie, self.beyond) if q]

    def choose(self, s: Session, last: tuple[Any, ...], batch: int) -> list[tuple[Any, ...]]:
        """The next ``batch`` rows after ``last`` (the (``order``, key) values of a chosen row)."""
        params = self.e.params
        if not last:
            return [tuple(r) for r in s.all(self.first, (*params, batch))]
        chosen = [tuple(r) for r in s.all(self.tie, (*params, *last, batch))]
        if self.beyond and len(chosen) < batch:
            chosen += [tuple(r) for r in s.all(self.beyond, (*params, last[0], batch - len(chosen)))]
        return chosen

    def delete(self, s: Session, chosen: list[tuple[Any, ...]]) -> int:
        """Delete the chosen rows that the condition still selects: a row a concurrent transaction
        made live again since the batch was chosen (PostgreSQL re-reads a row it waited for) is
        left alone."""
        keys = [r[-self.width:] for r in chosen]
        step = max(1, self.KEYS_PER_STATEMENT // self.width)
        n = 0
        for i in range(0, len(keys), step):
            part = keys[i:i + step]
            n += s.count(f"DELETE FROM {self.e.table} WHERE ({self.key}) IN (VALUES {', '.join([self.row] * len(part))})"
                         f" AND {self.e.where}", (*(v for k in part for v in k), *self.e.params))
        return n
