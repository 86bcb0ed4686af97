"""Deleting rows past their retention in bounded batches (storage limitation: GDPR art. 5(1)(e)).

Each storage part says which of its rows are past their use (:class:`Expiry`); :func:`purge`
deletes them ``batch`` rows per transaction, so that millions of rows never hold one long
transaction, nor the tables the services write (on SQLite the single write lock) for longer than
a batch. `biogate purge` (services/commands/retention.py) runs it on a schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .db import Database


@dataclass(frozen=True)
class Expiry:
    """The rows of ``table`` that ``where`` selects (``?`` bound to ``params``) are past their
    retention; ``key`` (columns, comma-separated) identifies a row. ``where`` may refer to the table by its name."""

    kind: str
    table: str
    where: str
    params: Sequence[Any] = ()
    key: str = "id"


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
        # The condition twice: the inner one picks a batch, the outer one is checked again on each
        # row as it is deleted, so that a row a concurrent transaction made live again (PostgreSQL
        # re-reads a row it waited for) is left alone.
        sql = (f"DELETE FROM {e.table} WHERE ({e.key}) IN (SELECT {e.key} FROM {e.table} WHERE {e.where}"
               f" LIMIT {int(batch)}) AND {e.where}")
        while True:
            try:
                with db.transaction() as s:
                    n = s.count(sql, (*e.params, *e.params))
            except Exception as exc:
                raise PurgeFailed(deleted, exc) from exc
            deleted[e.kind] += n
            if on_batch is not None and n:
                on_batch(e.kind, n)
            if n < batch:
                break
    return deleted
