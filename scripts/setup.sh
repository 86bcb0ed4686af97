#!/usr/bin/env bash
# Prepares a fresh machine for BioGate: a Python 3.11 virtual environment in .venv with the pinned
# dependencies, then the model files of models/manifest.yaml. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${BIOGATE_PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.biogate-deps
want=$(cat pyproject.toml clients/python/pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)

step() { echo "setup: $*" >&2; }
# pip without -q shows each download's progress; its "Requirement already satisfied" chatter is dropped.
pip_install() { "$VENV/bin/pip" install --disable-pip-version-check --progress-bar on "$@" | { grep -v '^Requirement already satisfied' || true; }; }

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  step "[1/4] creating the virtual environment $VENV with $PY"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
  # torch first and by exact version: this machine's pip takes the CPU wheel from local disk,
  # whereas anything looser (silero-vad and speechbrain ask for "torch") pulls a multi-GB CUDA build.
  step "[2/4] installing torch 2.13.0 (CPU build)"
  pip_install torch==2.13.0
  step "[3/4] installing BioGate's pinned dependencies (constraints.txt), then BioGate itself (editable)"
  "$VENV/bin/python" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))' > "$VENV/requirements.txt"
  pip_install -c constraints.txt -r "$VENV/requirements.txt"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e .
  # the client SDK (clients/python, import biogate_client): its dependencies are BioGate's own
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e clients/python
  # speechbrain pulls torchaudio built for CUDA; its compiled extension cannot load beside the CPU
  # torch (libc10_cuda.so missing). Without it torchaudio falls back to the pure-Python code that
  # ECAPA's feature extraction uses (see ../shared/docs/MODELS.md).
  rm -f "$VENV"/lib/python3*/site-packages/torchaudio/lib/*.so
  echo "$want" > "$STAMP"
fi

# Debian packages: espeak-ng synthesises speech for the voice anti-spoofing tests; SoftHSM2 is the
# PKCS#11 token the HSM key backend is tested against; Chromium and its WebDriver run the kiosk page
# in tests/web (headless, a fake camera fed from the fixtures).
step "system packages the tests use (espeak-ng, sox, softhsm2, chromium, chromium-driver)"
need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng sox)
command -v softhsm2-util >/dev/null 2>&1 || need+=(softhsm2)
{ command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ]; } || need+=(chromium chromium-driver)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null) \
    || echo "setup: could not install ${need[*]}; voice spoof, PKCS#11 and kiosk page tests will fail" >&2
fi
# The Kubernetes manifests are rendered by kubectl's built-in kustomize (no Debian package is
# recent enough); it comes with the machine.
command -v kubectl >/dev/null 2>&1 || echo "setup: kubectl not found; tests/deploy/test_kubernetes.py will fail" >&2

step "[4/4] fetching and verifying the model files of models/manifest.yaml"
"$VENV/bin/biogate" models fetch
