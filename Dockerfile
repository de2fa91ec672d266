# syntax=docker/dockerfile:1.7
#
# vss server images.
#   docker build --target gpu -t vss:gpu .   NVIDIA CUDA 13 runtime + cuDNN, onnxruntime-gpu (default target)
#   docker build --target cpu -t vss:cpu .   python:3.11-slim, CPU torch and onnxruntime
#
# Both install exactly what CI installs: `pip install -c constraints.txt .`; the GPU image swaps the
# `onnxruntime==X` pin for `onnxruntime-gpu==X` (same version; the two must never be installed together).
# One container serves one GPU with one uvicorn process: run more containers for more GPUs, all
# sharing the model volume (each follows the registry's ACTIVE pointer).
# Running it requires VSS_API_KEY (the server refuses to listen publicly without one).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

# ---------------------------------------------------------------------------------------------
# uv only provides a relocatable CPython 3.11 for the CUDA image (Ubuntu 24.04 ships 3.12).
FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN uv python install 3.11 \
    && uv venv --python 3.11 --seed /opt/venv
WORKDIR /src
# Dependencies first (a layer that survives code changes), then the project itself.
COPY pyproject.toml constraints.txt ./
RUN sed 's/^onnxruntime==/onnxruntime-gpu==/' constraints.txt > /tmp/constraints-gpu.txt \
    && grep -q '^onnxruntime-gpu==' /tmp/constraints-gpu.txt \
    && /opt/venv/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -c /tmp/constraints-gpu.txt -r /tmp/requirements.txt \
        "$(grep '^onnxruntime-gpu==' /tmp/constraints-gpu.txt)"
COPY . .
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps -c /tmp/constraints-gpu.txt . \
    && /opt/venv/bin/pip check

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
COPY --from=gpu-build /opt/python /opt/python
COPY --from=gpu-build /opt/venv /opt/venv
RUN useradd --system --uid 10001 --create-home --home-dir /home/vss vss \
    && mkdir -p /data/models /data/buffer /data/cache /data/jobs \
    && chown -R vss:vss /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VSS_HOST=0.0.0.0 \
    VSS_PORT=8000 \
    VSS_DEVICE=auto \
    VSS_MODEL_DIR=/data/models \
    VSS_BUFFER_DIR=/data/buffer \
    VSS_CACHE_DIR=/data/cache \
    VSS_JOB_DIR=/data/jobs
VOLUME ["/data/models", "/data/buffer"]
WORKDIR /home/vss
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VSS_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["vss"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_EXTRA_INDEX_URL=https://pypi.org/simple
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt ./
# torch==2.14.1 in constraints.txt admits the 2.14.1+cpu wheel from the PyTorch CPU index (no CUDA libraries).
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt "$(grep '^onnxruntime==' constraints.txt)"
COPY . .
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps -c constraints.txt ".[cpu]" \
    && /opt/venv/bin/pip check

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
COPY --from=cpu-build /opt/venv /opt/venv
RUN useradd --system --uid 10001 --create-home --home-dir /home/vss vss \
    && mkdir -p /data/models /data/buffer /data/cache /data/jobs \
    && chown -R vss:vss /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VSS_HOST=0.0.0.0 \
    VSS_PORT=8000 \
    VSS_DEVICE=cpu \
    VSS_MODEL_DIR=/data/models \
    VSS_BUFFER_DIR=/data/buffer \
    VSS_CACHE_DIR=/data/cache \
    VSS_JOB_DIR=/data/jobs
VOLUME ["/data/models", "/data/buffer"]
WORKDIR /home/vss
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VSS_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["vss"]
CMD ["serve"]

# The last stage is the default target: build the GPU image unless --target cpu is given.
FROM gpu AS default
