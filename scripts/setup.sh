#!/usr/bin/env bash
# Prepares a fresh machine for BioGate: a Python 3.11 virtual environment in .venv with the pinned
# dependencies, then the model files of models/manifest.yaml. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${BIOGATE_PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.biogate-deps
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating $VENV with $PY" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first and by exact version: this machine's pip takes the CPU wheel from local disk,
  # whereas anything looser (silero-vad and speechbrain ask for "torch") pulls a multi-GB CUDA build.
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -c constraints.txt -e ".[dev]"
  # speechbrain pulls torchaudio built for CUDA; its compiled extension cannot load beside the CPU
  # torch (libc10_cuda.so missing). Without it torchaudio falls back to the pure-Python code that
  # ECAPA's feature extraction uses (see ../shared/docs/MODELS.md).
  rm -f "$VENV"/lib/python3*/site-packages/torchaudio/lib/*.so
  echo "$want" > "$STAMP"
fi

# Debian packages: espeak-ng synthesises speech for the voice anti-spoofing tests; SoftHSM2 is the
# PKCS#11 token the HSM key backend is tested against.
need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng sox)
command -v softhsm2-util >/dev/null 2>&1 || need+=(softhsm2)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null) \
    || echo "setup: could not install ${need[*]}; voice spoof and PKCS#11 tests will fail" >&2
fi
# The Kubernetes manifests are rendered by kubectl's built-in kustomize (no Debian package is
# recent enough); it comes with the machine.
command -v kubectl >/dev/null 2>&1 || echo "setup: kubectl not found; tests/deploy/test_kubernetes.py will fail" >&2

"$VENV/bin/biogate" models fetch
