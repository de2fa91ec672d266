#
# vss server images: two targets, one slim Python base, built with BuildKit (see README, Docker).
#   docker build --target cpu -t vss:cpu .   CPU torch (PyTorch CPU index) and onnxruntime
#   docker build --target gpu -t vss:gpu .   CUDA torch from the package index, whose nvidia-* wheels
#                                            also serve onnxruntime-gpu (default target)
#
# Both install exactly what CI installs: `pip install -c constraints.txt .`; the GPU image swaps the
# `onnxruntime==X` pin for `onnxruntime-gpu==X` (same version; the two must never be installed together).
# Nothing is downloaded at build time except from the package index the build arguments name:
#   --build-arg PYTHON_IMAGE=...         base image with python3.11 + venv (e.g. a mirror's copy)
#   --build-arg PIP_INDEX_URL=...        the pip index (default: pip's own, i.e. PyPI)
#   --build-arg PIP_EXTRA_INDEX_URL=...  more indexes; the cpu target defaults to the PyTorch CPU index,
#                                        pass it empty (or a mirror of that index) behind a mirror
#   --build-arg PIP_TRUSTED_HOST=...     hosts pip may reach over plain http or unverified TLS
#   --secret id=pip.conf,src=FILE        optional pip config (credentials stay out of the layers)
#   --secret id=ca.pem,src=FILE          optional CA bundle for a TLS-intercepting proxy
# One container serves one GPU with one uvicorn process: run more containers for more GPUs, all
# sharing the model volume (each follows the registry's ACTIVE pointer).
# Running it requires VSS_API_KEY (the server refuses to listen publicly without one).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# What both runtime images share: the user, the data directories, the environment.
FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --system --uid 10001 --create-home --home-dir /home/vss vss \
    && mkdir -p /data/models /data/buffer /data/cache /data/jobs \
    && chown -R vss:vss /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VSS_HOST=0.0.0.0 \
    VSS_PORT=8000 \
    VSS_MODEL_DIR=/data/models \
    VSS_BUFFER_DIR=/data/buffer \
    VSS_CACHE_DIR=/data/cache \
    VSS_JOB_DIR=/data/jobs
VOLUME ["/data/models", "/data/buffer"]
WORKDIR /home/vss
EXPOSE 8000

# ---------------------------------------------------------------------------------------------
# What both builds share: a venv and the dependency list of pyproject.toml.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first (a layer that survives code changes), then the project itself.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt

# ---------------------------------------------------------------------------------------------
FROM build AS cpu-build
ARG PIP_INDEX_URL
# torch==2.14.1 in constraints.txt admits 2.14.1+cpu, which pip prefers when this index has it (no CUDA).
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_TRUSTED_HOST
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf,required=false \
    --mount=type=secret,id=ca.pem,target=/run/secrets/ca.pem,required=false \
    if [ -s /run/secrets/ca.pem ]; then export PIP_CERT=/run/secrets/ca.pem; fi \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt \
        "$(grep '^onnxruntime==' constraints.txt)"
COPY . .
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf,required=false \
    --mount=type=secret,id=ca.pem,target=/run/secrets/ca.pem,required=false \
    if [ -s /run/secrets/ca.pem ]; then export PIP_CERT=/run/secrets/ca.pem; fi \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps -c constraints.txt ".[cpu]" \
    && /opt/venv/bin/pip check

# ---------------------------------------------------------------------------------------------
FROM build AS gpu-build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf,required=false \
    --mount=type=secret,id=ca.pem,target=/run/secrets/ca.pem,required=false \
    if [ -s /run/secrets/ca.pem ]; then export PIP_CERT=/run/secrets/ca.pem; fi \
    && sed 's/^onnxruntime==/onnxruntime-gpu==/' constraints.txt > /tmp/constraints-gpu.txt \
    && grep -q '^onnxruntime-gpu==' /tmp/constraints-gpu.txt \
    && /opt/venv/bin/pip install --no-cache-dir -c /tmp/constraints-gpu.txt -r /tmp/requirements.txt \
        "$(grep '^onnxruntime-gpu==' /tmp/constraints-gpu.txt)"
COPY . .
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf,required=false \
    --mount=type=secret,id=ca.pem,target=/run/secrets/ca.pem,required=false \
    if [ -s /run/secrets/ca.pem ]; then export PIP_CERT=/run/secrets/ca.pem; fi \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps -c /tmp/constraints-gpu.txt . \
    && /opt/venv/bin/pip check

# ---------------------------------------------------------------------------------------------
# No CUDA base image: torch's nvidia-* wheels (CUDA 13, cuDNN 9) are the only copy of CUDA, and the
# dynamic loader is told where they are so that onnxruntime-gpu's CUDA provider finds them too.
# The host needs an NVIDIA driver for CUDA 13 and the NVIDIA container toolkit (`--gpus`).
FROM runtime AS gpu
COPY --from=gpu-build /opt/venv /opt/venv
RUN find /opt/venv -path '*/site-packages/nvidia/*/lib' -type d > /etc/ld.so.conf.d/vss-nvidia-wheels.conf \
    && grep -q '/nvidia/cu13/lib$' /etc/ld.so.conf.d/vss-nvidia-wheels.conf \
    && ldconfig
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VSS_DEVICE=auto
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VSS_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["vss"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
FROM runtime AS cpu
COPY --from=cpu-build /opt/venv /opt/venv
ENV VSS_DEVICE=cpu
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VSS_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["vss"]
CMD ["serve"]

# The last stage is the default target: build the GPU image unless --target cpu is given.
FROM gpu AS default
