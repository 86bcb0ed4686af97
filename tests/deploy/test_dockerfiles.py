"""Dockerfile and Dockerfile.gpu, which no machine here can build, kept honest by reading them: every
COPY source exists, the models fetched at build are the configured defaults that registries carry
(and what the batch detector is derived from), every BIOGATE_* variable names a setting, the
entrypoint's command parses, package indexes come from build arguments, and the GPU image has a
CUDA torch and onnxruntime-gpu alone."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from services.cli import build_parser
from services.common.config import PROJECT_ROOT
from services.settings import load_config
from services.common.models.manifest import load_manifest
from tests.deploy.config_paths import names_a_setting

DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in (PROJECT_ROOT / name).read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            current = ""
    return out


def fetched_models(name: str) -> set[str]:
    ids: set[str] = set()
    for keyword, args in instructions(name):
        for m in re.finditer(r"biogate models fetch ((?:[a-z0-9.-]+ ?)+)", args) if keyword == "RUN" else ():
            ids |= set(m.group(1).split())
    return ids


def expected_models() -> tuple[set[str], set[str]]:
    """(fetched at build, operator-supplied): the configured defaults and their derivation inputs."""
    settings = load_config(None)
    manifest = load_manifest(settings.models.manifest)
    specs = {m.id: m for m in manifest.models}
    defaults = [settings.face.detector, settings.face.embedder, *settings.face.liveness,
                settings.voice.embedder, settings.voice.vad, settings.voice.antispoof, settings.voice.digits]
    fetched, operator = set(), set()
    for model_id in defaults:
        kinds = {src.kind for f in specs[model_id].files for src in f.sources}
        if kinds == {"local_dir"}:
            operator.add(model_id)
            continue
        fetched.add(model_id)
        for f in specs[model_id].files:
            for src in f.sources:
                if src.kind == "derived" and src.input.model:
                    fetched.add(src.input.model)
    return fetched, operator


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copied_path_exists(name):
    copies = [args for keyword, args in instructions(name) if keyword == "COPY" and not args.startswith("--from")]
    assert copies
    for args in copies:
        *sources, _ = shlex.split(args)
        for source in sources:
            assert (PROJECT_ROOT / source).exists(), f"{name}: COPY {source}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_models_fetched_at_build_are_the_configured_defaults(name):
    fetched, operator = expected_models()
    assert fetched_models(name) == fetched
    assert operator == {"minifasnet-v2-2.7", "minifasnet-v1se-4.0"}  # carried by no registry: mounted at start
    text = (PROJECT_ROOT / name).read_text()
    assert "/srv/biogate/models" in text and "BIOGATE_MODELS__LOCAL_DIRS='[\"/srv/biogate/models\"]'" in text


@pytest.mark.parametrize("name", DOCKERFILES)
def test_variables_name_settings_and_the_entrypoint_parses(name):
    steps = instructions(name)
    for keyword, args in steps:
        if keyword == "ENV":
            for variable in re.findall(r"(?:^|\s)(BIOGATE_[A-Z0-9_]+)=", args):
                assert names_a_setting(variable), f"{name}: ENV {variable}"
        if keyword == "RUN":
            for variable in re.findall(r"(BIOGATE_[A-Z0-9_]+)=", args):
                assert names_a_setting(variable), f"{name}: RUN {variable}"
    entrypoint = [json.loads(args) for keyword, args in steps if keyword == "ENTRYPOINT"][-1]
    command = [json.loads(args) for keyword, args in steps if keyword == "CMD"][-1]
    assert entrypoint == ["biogate"]
    build_parser().parse_args(command)  # raises SystemExit on an unknown subcommand
    build_parser().parse_args(["migrate"])  # what the Kubernetes Job runs with this entrypoint


@pytest.mark.parametrize("name", DOCKERFILES)
def test_package_indexes_are_build_arguments(name):
    steps = instructions(name)
    args = {a.split("=")[0] for keyword, a in steps if keyword == "ARG"}
    assert {"PIP_INDEX_URL", "TORCH_INDEX_URL", "NPM_REGISTRY"} <= args
    for keyword, text in steps:
        if keyword == "RUN":
            assert "://" not in text, f"{name}: a URL hard-coded in RUN {text[:80]}"
            if "pip install torch" in text:
                assert "--index-url ${TORCH_INDEX_URL}" in text


def test_the_cpu_image_has_cpu_torch_and_the_gpu_image_cuda_torch_and_one_onnxruntime():
    def default(name, arg):
        return next(a.split("=", 1)[1] for k, a in instructions(name) if k == "ARG" and a.startswith(arg + "="))

    assert default("Dockerfile", "TORCH_INDEX_URL").endswith("/whl/cpu")
    assert re.search(r"/whl/cu1\d\d$", default("Dockerfile.gpu", "TORCH_INDEX_URL"))
    gpu = " ".join(a for k, a in instructions("Dockerfile.gpu") if k == "RUN")
    assert "pip uninstall -y onnxruntime" in gpu and "pip install --no-deps -c constraints.txt onnxruntime-gpu" in gpu
    assert "! pip show onnxruntime" in gpu and "torch.version.cuda" in gpu
    pins = dict(line.split("==") for line in (PROJECT_ROOT / "constraints.txt").read_text().split() if "==" in line)
    assert "onnxruntime-gpu" in pins
    cpu = " ".join(a for k, a in instructions("Dockerfile") if k == "RUN")
    assert "onnxruntime-gpu" not in cpu


def test_the_gpu_image_and_extra_have_nvimagecodec_for_the_cuda_of_the_image():
    """face.jpeg_decoder=auto decodes JPEGs with nvJPEG on CUDA: the GPU image installs nvImageCodec
    and nvJPEG for the image's CUDA major version (the one onnxruntime-gpu and torch use), pinned."""
    import tomllib

    cuda_major = re.search(r"nvidia/cuda:(\d+)\.", " ".join(a for k, a in instructions("Dockerfile.gpu") if k == "ARG"))
    assert cuda_major
    package = f"nvidia-nvimgcodec-cu{cuda_major.group(1)}"
    gpu = " ".join(a for k, a in instructions("Dockerfile.gpu") if k == "RUN")
    assert f'pip install -c constraints.txt "{package}[nvjpeg]"' in gpu and "import nvidia.nvimgcodec" in gpu
    pins = dict(line.split("==") for line in (PROJECT_ROOT / "constraints.txt").read_text().split() if "==" in line)
    assert package in pins and "nvidia-nvjpeg" in pins
    extras = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"{package}[nvjpeg]" in extras["gpu"]
    assert "nvimgcodec" not in " ".join(a for k, a in instructions("Dockerfile") if k == "RUN")
