"""Two processes fetching into one fresh cache at once end with one correct copy of each file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import filelock

from services.common.config import PROJECT_ROOT
from services.common.models import ModelStore

IDS = ["yunet-2023mar", "sface-2021dec-batch", "minifasnet-v2-2.7", "silero-vad-v6"]

SCRIPT = """
import json, logging, sys
from pathlib import Path
from services.settings import load_config
from services.common.models import ModelStore
logging.basicConfig(level=logging.INFO, format="%(message)s")
data_dir, models, ready, ids = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
store = ModelStore(load_config(None, data_dir=data_dir, models=models))
ready.touch()
print(json.dumps([[r.model_id, r.file, r.action] for r in store.fetch(ids)]))
"""


def test_concurrent_fetches_do_not_corrupt_the_cache(tmp_path: Path, store_settings, shared_models: Path):
    settings = store_settings(tmp_path / "data", local_dirs=[shared_models])
    models = json.loads(settings.models.model_dump_json())
    cache = settings.models_cache_dir
    cache.mkdir(parents=True)
    blocker = filelock.FileLock(cache / ".lock")
    blocker.acquire()  # both start while the cache is locked, so both must wait and then race
    procs = []
    try:
        for n in range(2):
            ready = tmp_path / f"ready-{n}"
            cmd = [sys.executable, "-c", SCRIPT, str(settings.data_dir), json.dumps(models), str(ready), *IDS]
            procs.append((ready, subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE, text=True, env=dict(os.environ))))
        deadline = time.monotonic() + 120
        while not all(r.exists() for r, _ in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        blocker.release()
    outputs = []
    for _, proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        outputs.append((json.loads(out.strip().splitlines()[-1]), err))

    assert any("waiting for another process" in err for _, err in outputs)
    fetched = Counter((m, f) for results, _ in outputs for m, f, action in results if action == "fetched")
    store = ModelStore(settings)
    expected = {(i, f.name) for i in IDS for f in store.model(i).files} | {("sface-2021dec", "face_recognition_sface_2021dec.onnx")}
    # Each file was written by exactly one of the two; the other found it cached. (The SFace original
    # is fetched as the derivation's input, so it is not in either list of results.)
    assert set(fetched) | {("sface-2021dec", "face_recognition_sface_2021dec.onnx")} == expected
    assert all(count == 1 for count in fetched.values())
    assert store.verify(IDS + ["sface-2021dec"]) == []
    assert list(cache.rglob("*.part")) == [] and list(cache.rglob(".dl-*")) == []
