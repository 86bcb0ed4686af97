"""1:N galleries in memory: per (tenant, model) a matrix of the enrolled embeddings, searched with
one matrix-vector product.

Consistency: the service updates a loaded gallery itself after its own enrolments and deletions.
Changes by other processes are found by comparing storage-side figures with the matrix's: before
each search (at most every ``check_s``) the template count, one index-only query (19 ms at 100k
templates on SQLite here), which catches any enrolment or erasure (e.g. the MFA service erasing a
subject); every ``full_check_s`` also the latest updated_at, a table scan (250 ms at 100k), which
catches a re-enrolment by another replica. A difference triggers a resync that reads the gallery's
records and decrypts only those whose (subject, updated_at) changed. Correct at 100,000 templates
per gallery (tests/face/test_gallery.py): 77 MB of float32 for 192-d; the product itself takes a
few milliseconds.

Scaling path beyond one machine's ~10^6-10^7 templates: shard galleries by subject hash across
replicas and merge the per-shard top-k; replace the exhaustive product with an IVF/HNSW index
(FAISS) with re-ranking of the candidates by exact cosine; replace the version poll with a change
feed (an outbox table or PostgreSQL LISTEN/NOTIFY) so that resyncs read only the changed rows.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from services.face.templates import TemplateVault

Version = tuple[int, "datetime | None"]


@dataclass
class _Gallery:
    subjects: list[str] = field(default_factory=list)
    stamps: list[datetime] = field(default_factory=list)
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    index: dict[str, int] = field(default_factory=dict)
    checked: float = 0.0
    full_checked: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def size(self) -> int:
        return len(self.subjects)

    def version(self) -> Version:
        return self.size, (max(self.stamps) if self.stamps else None)

    def set_rows(self, subjects: list[str], stamps: list[datetime], matrix: np.ndarray) -> None:
        self.subjects, self.stamps = subjects, stamps
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self.index = {s: i for i, s in enumerate(subjects)}

    def upsert(self, subject: str, stamp: datetime, embedding: np.ndarray) -> None:
        i = self.index.get(subject)
        if i is not None:
            self.matrix[i] = embedding
            self.stamps[i] = stamp
            return
        self.set_rows(self.subjects + [subject], self.stamps + [stamp], np.vstack([self.matrix.reshape(-1, len(embedding)), embedding[None]]))

    def remove(self, subject: str) -> None:
        i = self.index.get(subject)
        if i is None:
            return
        keep = np.ones(self.size, bool)
        keep[i] = False
        self.set_rows(
            [s for j, s in enumerate(self.subjects) if j != i],
            [t for j, t in enumerate(self.stamps) if j != i],
            self.matrix[keep],
        )


class Galleries:
    def __init__(
        self, storage, vault: TemplateVault, check_s: float = 0.0, full_check_s: float = 10.0, batch: int = 2000
    ) -> None:
        self.storage = storage
        self.vault = vault
        self.check_s = check_s
        self.full_check_s = full_check_s
        self.batch = batch
        self._galleries: dict[tuple[str, str], _Gallery] = {}
        self._lock = threading.Lock()
        self.resyncs = 0  # for tests and metrics
        self.decrypted = 0

    def _gallery(self, tenant_id: str, model_id: str) -> _Gallery:
        with self._lock:
            return self._galleries.setdefault((tenant_id, model_id), _Gallery())

    def search(self, tenant_id: str, model_id: str, probe: np.ndarray, k: int) -> tuple[list[tuple[str, float]], int]:
        """The top ``k`` (subject, cosine) of the gallery, best first, and the gallery's size."""
        g = self._gallery(tenant_id, model_id)
        with g.lock:
            self._sync(g, tenant_id, model_id)
            if g.size == 0:
                return [], 0
            scores = g.matrix @ np.asarray(probe, np.float32)
            k = min(k, g.size)
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top], kind="stable")]
            return [(g.subjects[i], float(scores[i])) for i in top], g.size

    def enrolled(self, tenant_id: str, model_id: str, subject_id: str, stamp: datetime, embedding: np.ndarray) -> None:
        """After this process stored a template: update the gallery if it is loaded."""
        g = self._galleries.get((tenant_id, model_id))
        if g is not None:
            with g.lock:
                if g.checked:
                    g.upsert(subject_id, stamp, np.asarray(embedding, np.float32))

    def deleted(self, tenant_id: str, subject_id: str) -> None:
        for (tenant, _), g in list(self._galleries.items()):
            if tenant == tenant_id:
                with g.lock:
                    g.remove(subject_id)

    def _sync(self, g: _Gallery, tenant_id: str, model_id: str) -> None:
        now = time.monotonic()
        if g.checked and now - g.checked < self.check_s:
            return
        if not g.checked:
            stale = True
        elif now - g.full_checked >= self.full_check_s:
            stale = self.storage.templates.gallery_version(tenant_id, "face", model_id) != g.version()
            g.full_checked = now
        else:
            stale = self.storage.templates.count_gallery(tenant_id, "face", model_id) != g.size
        if stale:
            self._resync(g, tenant_id, model_id)
            g.full_checked = now
        g.checked = now

    def _resync(self, g: _Gallery, tenant_id: str, model_id: str) -> None:
        known = {s: (g.stamps[i], i) for s, i in g.index.items()}
        subjects: list[str] = []
        stamps: list[datetime] = []
        rows: list[np.ndarray] = []
        for batch in self.storage.templates.iter_gallery(tenant_id, "face", model_id, "", self.batch):
            for rec in batch:
                old = known.get(rec.subject_id)
                if old is not None and old[0] == rec.updated_at:
                    rows.append(g.matrix[old[1]])
                else:
                    rows.append(self.vault.open(rec))
                    self.decrypted += 1
                subjects.append(rec.subject_id)
                stamps.append(rec.updated_at)
        matrix = np.stack(rows) if rows else np.zeros((0, g.matrix.shape[1] if g.matrix.ndim == 2 else 0), np.float32)
        g.set_rows(subjects, stamps, matrix)
        self.resyncs += 1
