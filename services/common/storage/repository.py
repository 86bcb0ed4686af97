"""Base of the SQL repositories: one table of one record type, and the statements they all need."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Generic, TypeVar

from .db import Database, Session
from .errors import AlreadyExistsError
from .rows import columns, insert_sql, to_record, values

R = TypeVar("R")


class Repository(Generic[R]):
    table: ClassVar[str]
    record: ClassVar[type]  # the record dataclass stored in `table`

    def __init__(self, db: Database) -> None:
        self._db = db

    @property
    def _cols(self) -> str:
        return columns(self.record)

    def _returning(self, s: Session, query: str, params: Sequence[Any]) -> R | None:
        """Run a statement ending in RETURNING <the record's columns>."""
        row = s.one(f"{query} RETURNING {self._cols}", params)
        return to_record(self.record, row) if row else None

    def _select(self, where: str, params: Sequence[Any], tail: str = "") -> list[R]:
        with self._db.read() as s:
            rows = s.all(f"SELECT {self._cols} FROM {self.table} WHERE {where} {tail}", params)
        return [to_record(self.record, r) for r in rows]

    def _select_one(self, where: str, params: Sequence[Any], tail: str = "") -> R | None:
        found = self._select(where, params, tail)
        return found[0] if found else None

    def _insert_new(self, rec: R, conflict: str) -> R:
        """Insert; AlreadyExistsError(conflict) when any unique key of the table is taken."""
        with self._db.transaction() as s:
            row = self._returning(
                s, insert_sql(self.table, self.record) + " ON CONFLICT DO NOTHING", values(rec)
            )
        if row is None:
            raise AlreadyExistsError(conflict)
        return row

    def _update_one(self, query: str, params: Sequence[Any]) -> bool:
        """Run a conditional UPDATE; True when it changed the row (compare-and-swap)."""
        with self._db.transaction() as s:
            return s.count(query, params) == 1

    def _swap_envelope(
        self, query: str, params: tuple[Any, ...], column: str, expected: bytes | None
    ) -> bool:
        """Envelope compare-and-swap on key id, and on the old envelope's bytes when given."""
        if expected is not None:
            query += f" AND {column} = ?"
            params += (expected,)
        return self._update_one(query, params)

    def delete_for_subject(self, tenant_id: str, subject_id: str) -> int:
        with self._db.transaction() as s:
            return s.count(
                f"DELETE FROM {self.table} WHERE tenant_id = ? AND subject_id = ?",
                (tenant_id, subject_id),
            )
