"""Which model runs is decided by the model manifest: a configuration names model ids, the manifest
entry of each names its role and ``architecture``, and one router per role maps the architecture
to the code that builds it (InsightFace model_zoo style: one small module per model, one router).

Routers check the configured ids when the service is defined, before anything loads: an id the
manifest does not have, a model of another role, or an architecture the service cannot run fails
start-up with a message naming the setting and the id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Mapping, TypeVar

from services.common.models import ModelStore, UnknownModelError
from services.common.models.manifest import Manifest, ModelSpec

B = TypeVar("B", bound=Callable)


class ModelChoiceError(ValueError):
    """A configured model id this service cannot run."""


@dataclass(frozen=True)
class Router(Generic[B]):
    role: str  # the manifest role, e.g. "face_embedder"
    setting: str  # the configuration key that names the model, e.g. "face.embedder"
    builders: Mapping[str, B]  # architecture -> what builds the model object

    def spec(self, manifest: Manifest, model_id: str) -> ModelSpec:
        try:
            spec = manifest.model(model_id)
        except UnknownModelError:
            known = ", ".join(m.id for m in manifest.models if m.role == self.role)
            raise ModelChoiceError(f"{self.setting}: {model_id!r} is not in the model manifest "
                                   f"(its {self.role} models: {known})") from None
        if spec.role != self.role:
            raise ModelChoiceError(f"{self.setting}: {model_id!r} is a {spec.role} model, not a {self.role}")
        self.builder(spec)
        return spec

    def builder(self, spec: ModelSpec) -> B:
        found = self.builders.get(spec.architecture or "")
        if found is None:
            raise ModelChoiceError(f"{self.setting}: {spec.id!r} has architecture {spec.architecture!r}, which this "
                                   f"service does not run (it runs {', '.join(sorted(self.builders))})")
        return found

    def by_architecture(self, architecture: str) -> B:
        if architecture not in self.builders:
            raise ModelChoiceError(f"no {self.role} of architecture {architecture!r} "
                                   f"(known: {', '.join(sorted(self.builders))})")
        return self.builders[architecture]


def fetch_verified(store: ModelStore, model_ids: Iterable[str]) -> None:
    """Make the models' files present and check their sha256 (raises: the service stays NOT_SERVING)."""
    ids = list(dict.fromkeys(model_ids))
    for model_id in ids:
        if not store.model(model_id).active:
            raise RuntimeError(f"model {model_id} is marked inactive in the manifest")
    store.fetch(ids)  # cheap when cached; picks up operator-supplied files from the local dirs
    problems = store.verify(ids)
    if problems:
        raise RuntimeError("; ".join(str(p) for p in problems))
