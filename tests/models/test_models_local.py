"""Operator-supplied files (local dirs), URL downloads, and the errors when no source delivers."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from services.common.models import FetchError, ModelStore, ModelUnavailableError
from services.common.models.manifest import parse_manifest
from tests.conftest import present
from tests.mfa.hostile import RawServer, finishes, trickle

LOCAL_ONLY = ["scrfd-500m", "scrfd-2.5g", "minifasnet-v2-2.7", "minifasnet-v1se-4.0", "aasist-l"]


def test_local_only_models_come_from_the_local_dirs(tmp_path: Path, store_settings, shared_models: Path):
    empty = tmp_path / "operator-dir-without-models"
    empty.mkdir()
    store = ModelStore(store_settings(tmp_path / "data", local_dirs=[empty, shared_models], allow_registries=False))
    results = store.fetch(LOCAL_ONLY)
    assert {r.action for r in results} == {"fetched"}
    assert all(present(r.source).startswith("local file ") for r in results)
    assert store.verify(LOCAL_ONLY) == []
    conf = store.path("aasist-l", "AASIST-L.conf")
    assert conf.read_bytes() == (shared_models / "voice" / "AASIST-L.conf").read_bytes()
    assert store.path("aasist-l").name == "AASIST-L.pth"  # the manifest's main file


def test_a_missing_local_model_names_the_dirs_searched(tmp_path: Path, store_settings):
    dirs = [tmp_path / "models-a", tmp_path / "models-b"]
    store = ModelStore(store_settings(tmp_path / "data", local_dirs=dirs))
    with pytest.raises(FetchError) as info:
        store.fetch("scrfd-500m")
    message = str(info.value)
    assert "model 'scrfd-500m' file 'det_500m.onnx': no source delivered it" in message
    assert f"face/det_500m.onnx is in none of the local model dirs [{dirs[0]}, {dirs[1]}]" in message
    assert "BIOGATE_MODELS__LOCAL_DIRS" in message

    with pytest.raises(ModelUnavailableError) as unavailable:
        store.path("scrfd-500m")
    assert "'scrfd-500m' file 'det_500m.onnx' is not present" in str(unavailable.value)
    assert "run `biogate models fetch scrfd-500m`" in str(unavailable.value)
    assert store.status("scrfd-500m").state == "missing"


def test_every_requested_model_is_tried_before_failing(tmp_path: Path, store_settings, shared_models: Path):
    store = ModelStore(store_settings(tmp_path / "data", local_dirs=[tmp_path / "nothing"]))
    with pytest.raises(FetchError) as info:
        store.fetch(["scrfd-500m", "minifasnet-v2-2.7"])
    assert "'scrfd-500m'" in str(info.value) and "'minifasnet-v2-2.7'" in str(info.value)


def test_a_local_file_with_other_content_is_refused(tmp_path: Path, store_settings, shared_models: Path):
    operator = tmp_path / "operator"
    (operator / "face").mkdir(parents=True)
    # Same name, same size, other bytes: a different model the operator put there by mistake.
    original = shared_models / "face" / "minifasnet_v2_2.7_80x80.onnx"
    data = bytearray(original.read_bytes())
    data[100] ^= 0xFF
    (operator / "face" / original.name).write_bytes(bytes(data))
    store = ModelStore(store_settings(tmp_path / "data", local_dirs=[operator]))
    with pytest.raises(FetchError, match=r"local file face/minifasnet_v2_2.7_80x80.onnx: gave a file that has sha256 [0-9a-f]{64}, expected 7643c661"):
        store.fetch("minifasnet-v2-2.7")
    assert not (store.cache_dir / "minifasnet-v2-2.7" / original.name).exists()
    assert list(store.cache_dir.rglob("*.part")) == []


def test_registry_sources_can_be_turned_off(tmp_path: Path, store_settings):
    store = ModelStore(store_settings(tmp_path / "data", local_dirs=[], allow_registries=False))
    with pytest.raises(FetchError, match=r"PyPI silero-vad==6.2.3 wheel member .*: registry downloads are off"):
        store.fetch("silero-vad-v6")


@pytest.fixture
def http_root(tmp_path: Path):
    """A real HTTP server on loopback serving a folder."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _url_manifest(url: str, sha256: str, size: int):
    return parse_manifest({
        "version": 1,
        "models": [{
            "id": "aasist-l-conf", "role": "voice_antispoof", "version": "1", "active": True, "licence": "MIT",
            "files": [{"name": "AASIST-L.conf", "sha256": sha256, "size": size,
                       "sources": [{"kind": "url", "url": url}]}],
        }],
    })


def test_url_sources_need_allow_network(tmp_path: Path, store_settings, shared_models: Path, http_root):
    root, base = http_root
    conf = shared_models / "voice" / "AASIST-L.conf"
    shutil.copy(conf, root / "AASIST-L.conf")
    manifest = _url_manifest(f"{base}/AASIST-L.conf", hashlib.sha256(conf.read_bytes()).hexdigest(), conf.stat().st_size)

    offline = ModelStore(store_settings(tmp_path / "a", allow_network=False), manifest=manifest)
    with pytest.raises(FetchError, match=r"URL downloads are off \(Settings.models.allow_network\)"):
        offline.fetch()

    online = ModelStore(store_settings(tmp_path / "b", allow_network=True), manifest=manifest)
    assert [r.action for r in online.fetch()] == ["fetched"]
    assert online.path("aasist-l-conf").read_bytes() == conf.read_bytes()

    broken = ModelStore(store_settings(tmp_path / "c", allow_network=True),
                        manifest=_url_manifest(f"{base}/absent.conf", "0" * 64, 10))
    with pytest.raises(FetchError, match=r"download of .*/absent.conf failed: HTTP 404"):
        broken.fetch()


def test_a_url_download_is_bounded_in_all_by_fetch_timeout_s(tmp_path: Path, store_settings, http_root):
    """models.fetch_timeout_s said it bounded one URL download, but urlopen's timeout bounds each
    socket read: a server sending a byte at a time held `biogate models fetch` (and the fetch lock
    other processes wait on) for as long as it liked. A redirect is still followed."""
    root, base = http_root
    data = b"[model]\nlayers = 2\n"
    (root / "tiny.conf").write_bytes(data)
    stop = threading.Event()
    moved = RawServer(lambda conn: conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: {base}/tiny.conf\r\n"
                                                "Content-Length: 0\r\n\r\n".encode()))
    slow = RawServer(trickle(stop, b"HTTP/1.1 200 OK\r\nContent-Length: 60000\r\n\r\n"))
    try:
        store = ModelStore(store_settings(tmp_path / "a", allow_network=True),
                           manifest=_url_manifest(moved.url, hashlib.sha256(data).hexdigest(), len(data)))
        assert [r.action for r in store.fetch()] == ["fetched"]
        assert store.path("aasist-l-conf").read_bytes() == data
        store = ModelStore(store_settings(tmp_path / "b", allow_network=True, fetch_timeout_s=0.5),
                           manifest=_url_manifest(slow.url, "0" * 64, 60000))
        exc = finishes(store.fetch, within_s=20)
    finally:
        stop.set()
        moved.close()
        slow.close()
    assert isinstance(exc, FetchError) and "failed: TimeoutError" in str(exc), repr(exc)
    assert list(store.cache_dir.rglob("*.part")) == []
