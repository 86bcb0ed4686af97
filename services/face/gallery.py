"""1:N galleries in memory: per (tenant, model) a matrix of the enrolled embeddings, searched with
one matrix-vector product.

Consent: a gallery holds only the subjects whose active consent for biometric identification
lists the face (PIPL art. 29, GDPR art. 9(2)(a)); a consent to 1:1 verification alone keeps a
subject out, and their templates are never decrypted here. The checks below include the tenant's
latest consent change (two index seeks), so a grant or a withdrawal recorded by the MFA service
shows at the next search; and the candidates of every search are checked against storage before
they are returned, so a withdrawal takes effect at once whatever the check intervals.

Consistency: the service updates a loaded gallery itself after its own enrolments and deletions.
Changes by other processes are found by comparing storage-side figures with those the gallery last
saw: before each search (at most every ``check_s``) the template count, one index-only query (9-19
ms at 100k templates on SQLite here), which catches any enrolment or erasure (e.g. the MFA service
erasing a subject), and the latest consent change; every ``full_check_s`` also the latest
updated_at, a table scan (250 ms at 100k), which catches a re-enrolment by another replica. A
difference triggers a resync that reads the gallery's records of identifiable subjects and decrypts
only those whose (subject, updated_at) changed. Correct at 100,000 templates per gallery
(tests/face/test_gallery.py): 77 MB of float32 for 192-d; the product itself takes a few
milliseconds.

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

from services.common.subjects import IDENTIFICATION
from services.common.modality.templates import TemplateVault

# Storage-side figures of a gallery: templates (identifiable or not), latest update, latest consent change.
Version = tuple[int, "datetime | None", "datetime | None"]


@dataclass
class _Gallery:
    subjects: list[str] = field(default_factory=list)
    stamps: list[datetime] = field(default_factory=list)
    matrix: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    index: dict[str, int] = field(default_factory=dict)
    checked: float = 0.0
    full_checked: float = 0.0
    seen: Version = (0, None, None)  # the storage's figures at the last resync, kept up by local changes
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def size(self) -> int:
        return len(self.subjects)

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
            top = _top(g, probe, k)
            if self._withdrawn(tenant_id, top):  # consent withdrawn since the last check
                self._resync(g, tenant_id, model_id)
                top = _top(g, probe, k)
                withdrawn = self._withdrawn(tenant_id, top)  # withdrawn during the resync
                top = [c for c in top if c[0] not in withdrawn]
            return top, g.size

    def _withdrawn(self, tenant_id: str, top: list[tuple[str, float]]) -> set[str]:
        subjects = [s for s, _ in top]
        return set(subjects) - self.storage.subjects.consenting(tenant_id, IDENTIFICATION, "face", subjects)

    def enrolled(
        self, tenant_id: str, model_id: str, subject_id: str, stamp: datetime, embedding: np.ndarray, new: bool
    ) -> None:
        """After this process stored a template (``new``: a row, not a replacement): update the
        gallery if it is loaded, with the subject only if their consent covers identification."""
        g = self._galleries.get((tenant_id, model_id))
        if g is None:
            return
        identifiable = self.storage.subjects.consenting(tenant_id, IDENTIFICATION, "face", [subject_id])
        with g.lock:
            if not g.checked:
                return
            count, latest, consents = g.seen
            g.seen = count + new, max(latest, stamp) if latest else stamp, consents
            if identifiable:
                g.upsert(subject_id, stamp, np.asarray(embedding, np.float32))
            else:
                g.remove(subject_id)

    def deleted(self, tenant_id: str, subject_id: str) -> None:
        for (tenant, _), g in list(self._galleries.items()):
            if tenant == tenant_id:
                with g.lock:
                    # A subject outside the gallery leaves the count to the next check (a resync).
                    if subject_id in g.index:
                        g.remove(subject_id)
                        g.seen = g.seen[0] - 1, *g.seen[1:]

    def _sync(self, g: _Gallery, tenant_id: str, model_id: str) -> None:
        now = time.monotonic()
        if g.checked and now - g.checked < self.check_s:
            return
        if not g.checked:
            stale = True
        elif now - g.full_checked >= self.full_check_s:
            stale = self._version(tenant_id, model_id) != g.seen
            g.full_checked = now
        else:
            count = self.storage.templates.count_gallery(tenant_id, "face", model_id)
            stale = (count, self.storage.subjects.consent_changed_at(tenant_id, IDENTIFICATION)) != (g.seen[0], g.seen[2])
        if stale:
            self._resync(g, tenant_id, model_id)
            g.full_checked = now
        g.checked = now

    def _version(self, tenant_id: str, model_id: str) -> Version:
        count, latest = self.storage.templates.gallery_version(tenant_id, "face", model_id)
        return count, latest, self.storage.subjects.consent_changed_at(tenant_id, IDENTIFICATION)

    def _resync(self, g: _Gallery, tenant_id: str, model_id: str) -> None:
        # The figures are read before the rows: a change in between makes the next check resync again.
        seen = self._version(tenant_id, model_id)
        known = {s: (g.stamps[i], i) for s, i in g.index.items()}
        subjects: list[str] = []
        stamps: list[datetime] = []
        rows: list[np.ndarray] = []
        for batch in self.storage.templates.iter_gallery(tenant_id, "face", model_id, "", self.batch, IDENTIFICATION):
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
        g.seen = seen
        self.resyncs += 1


def _top(g: _Gallery, probe: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The top ``k`` (subject, cosine) of the gallery, best first."""
    if g.size == 0:
        return []
    scores = g.matrix @ np.asarray(probe, np.float32)
    k = min(k, g.size)
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [(g.subjects[i], float(scores[i])) for i in top]
