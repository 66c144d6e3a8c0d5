# LoRAFineTune images, two targets from one file (hack/image/build.sh builds both; `make image`):
#
#   trainer   (default target)      operator + trainer: torch (the CUDA build from PyPI, which also runs on CPU),
#                                   transformers, PEFT, DeepSpeed with its CPU ops compiled in. About 5.7 GB.
#   operator  (--target operator)   the operator only (pydantic, PyYAML, prometheus-client, kopf, kubernetes), under
#                                   400 MB: it never imports torch, and its pod should not pull the CUDA libraries.
#
#   operator: python -m lorafinetune.operator        trainer: torchrun -m lorafinetune.trainer (set by the Job)
#
# BASE is any Debian 12 image with Python 3.11: the official python image, or one made from Debian packages where
# no registry is reachable (hack/image/base.sh). Everything lives in the venv /opt/venv, on PATH, so `python`,
# `torchrun` and `lorafinetune` resolve on either. The pins come from pyproject.toml only (hack/image/requirements.py).
# Layers, bottom up: base, user and environment, pinned dependencies, DeepSpeed with its ops, the project. Editing
# lorafinetune/ rebuilds only the last (a second or two) and never reinstalls torch. The dependencies are installed
# in place in the final image's own lineage (not copied from a builder: buildah would re-read 5 GB to check its cache
# on every build); the compiler lives in a side stage that only hands over a DeepSpeed wheel.
#
# Runs as uid/gid 1000 (user lft, as the pods' securityContext) on a read-only root filesystem: every cache points at
# /tmp or /var/cache/lorafinetune, the Job's writable emptyDirs.
#
# Network from RUN steps: PyPI (pip) and the Debian mirror (apt, compiler stage only). Where PyPI needs a private CA,
# pass it as the build secret `pip-ca` with --build-arg PIP_CERT=/run/secrets/pip-ca: a secret is never in a layer.
# A pip cache mounted at /root/.cache/pip (podman build --volume) is used; without one pip keeps no cache, so none
# ends up in a layer.
ARG BASE=docker.io/library/python:3.11.14-slim-bookworm

# The requirement lists, from pyproject.toml. Later stages copy only these files, so a pyproject.toml edit that
# changes no pin (the version, a tool setting) reuses the installed dependencies. Their times are fixed because
# buildah's cache key for a COPY includes them.
FROM ${BASE} AS requirements
COPY pyproject.toml hack/image/requirements.py /src/
RUN cd /src \
 && python3 requirements.py pyproject.toml operator >operator.txt \
 && python3 requirements.py pyproject.toml train operator >trainer.txt \
 && python3 requirements.py pyproject.toml --build >build.txt \
 && touch -d @0 operator.txt trainer.txt build.txt

FROM ${BASE} AS runtime
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/lft --shell /usr/sbin/nologin lft \
 && install -d -o 1000 -g 1000 /var/cache/lorafinetune \
 && python3 -m venv /opt/venv
# The root filesystem is read-only in the pods; only /tmp and /var/cache/lorafinetune are writable (emptyDirs), and
# HOME is not. So nothing may default to ~:
#   LFT_CACHE_DIR       the trainer's converted models and tokenised data (the Job sets the same; `lorafinetune run`
#                       does not)
#   XDG_CACHE_HOME      torch hub and kernels, torch_extensions, huggingface (same place as the Job's HF_HOME), pip
#   XDG_CONFIG_HOME     anything that keeps settings under ~/.config
#   MPLCONFIGDIR        matplotlib's config and font cache (else ~/.config/matplotlib, or a new temp dir each run)
#   TRITON_HOME         triton's ~/.triton (dump, override); TRITON_CACHE_DIR its compiled kernels
#   CUDA_CACHE_PATH     the CUDA driver's PTX JIT cache (else ~/.nv/ComputeCache)
#   TORCH_EXTENSIONS_DIR   where torch/DeepSpeed compile ops at run time, if they ever do
#   PYTHONDONTWRITEBYTECODE   site-packages is read-only and already compiled: never try to write .pyc
# torch.compile's inductor cache defaults to /tmp/torchinductor_<user>, torchrun's logs to a temp dir: both fine.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/lft \
    LFT_CACHE_DIR=/var/cache/lorafinetune \
    XDG_CACHE_HOME=/var/cache/lorafinetune \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/matplotlib \
    TRITON_HOME=/var/cache/lorafinetune \
    TRITON_CACHE_DIR=/var/cache/lorafinetune/triton \
    CUDA_CACHE_PATH=/var/cache/lorafinetune/nv \
    TORCH_EXTENSIONS_DIR=/var/cache/lorafinetune/torch_extensions
WORKDIR /home/lft

# The project itself, as a wheel; its build backend is installed first so a source edit downloads nothing.
FROM runtime AS wheel
COPY --from=requirements /src/build.txt /tmp/
ARG PIP_CERT
ARG PIP_CACHE_DIR=/root/.cache/pip
RUN --mount=type=secret,id=pip-ca { mountpoint -q "$PIP_CACHE_DIR" || export PIP_NO_CACHE_DIR=1; } \
 && pip install -r /tmp/build.txt && rm /tmp/build.txt
COPY pyproject.toml README.md /src/
COPY lorafinetune /src/lorafinetune
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /dist /src

# ---------------------------------------------------------------- operator
FROM runtime AS operator
COPY --from=requirements /src/operator.txt /tmp/
ARG PIP_CERT
ARG PIP_CACHE_DIR=/root/.cache/pip
RUN --mount=type=secret,id=pip-ca { mountpoint -q "$PIP_CACHE_DIR" || export PIP_NO_CACHE_DIR=1; } \
 && pip install -r /tmp/operator.txt && rm /tmp/operator.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-deps --no-index /tmp/dist/*.whl && rm -r /tmp/dist
USER 1000:1000
CMD ["python", "-m", "lorafinetune.operator"]

# ---------------------------------------------------------------- trainer
# Every pinned dependency; DeepSpeed itself comes back below with its ops compiled (its own deps stay).
FROM runtime AS trainer-deps
COPY --from=requirements /src/trainer.txt /tmp/
ARG PIP_CERT
ARG PIP_CACHE_DIR=/root/.cache/pip
RUN --mount=type=secret,id=pip-ca { mountpoint -q "$PIP_CACHE_DIR" || export PIP_NO_CACHE_DIR=1; } \
 && pip install -r /tmp/trainer.txt && pip uninstall -y deepspeed

# Side stage with a compiler: a DeepSpeed wheel with the ops a CPU run needs compiled in. Without them DeepSpeed
# compiles them at first use into TORCH_EXTENSIONS_DIR, which needs g++, ninja and Python headers in the pod (none
# there) and a writable place:
#   shm_comm   DeepSpeed's shared-memory all-reduce: loaded by every deepspeed.initialize on DS_ACCELERATOR=cpu
#   cpu_adam   DeepSpeedCPUAdam (ZeRO optimizer offload)
# Built for DS_ACCELERATOR=cpu: DeepSpeed uses a prebuilt op only under the accelerator it was built for, so a GPU pod
# (accelerator cuda) would still try to compile cpu_adam at first use. portable-cxx: a fixed x86-64 level instead of
# the build machine's -march=native. The ops need no libgomp of their own: their OpenMP symbols resolve to the copy
# torch loads. The official python image has the Python headers already; Debian's python3 needs python3-dev.
FROM trainer-deps AS deepspeed-ops
RUN pkgs=g++ \
 && python3 -c 'import os, sysconfig; os.stat(sysconfig.get_paths()["include"] + "/Python.h")' 2>/dev/null \
    || pkgs="$pkgs python3-dev" \
 && apt-get update && apt-get install -y --no-install-recommends $pkgs && rm -rf /var/lib/apt/lists/*
COPY hack/image/portable-cxx.sh /usr/local/bin/portable-cxx
ARG PIP_CERT
ARG CPU_MARCH=x86-64-v3
RUN --mount=type=secret,id=pip-ca \
    DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 DS_ENABLE_NINJA=1 \
    CC=portable-cxx CXX=portable-cxx \
    pip wheel --no-cache-dir --no-build-isolation --use-pep517 --no-deps --wheel-dir /dist \
      "$(grep '^deepspeed==' /tmp/trainer.txt)"

FROM trainer-deps AS trainer
COPY --from=deepspeed-ops /dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-deps --no-index /tmp/dist/*.whl && rm -r /tmp/dist /tmp/trainer.txt \
 && python -c 'import importlib.util as u, runpy; d = u.find_spec("deepspeed").submodule_search_locations[0]; \
      g = runpy.run_path(d + "/git_version_info_installed.py"); i = g["installed_ops"]; \
      assert g["accelerator_name"] == "cpu" and i["cpu_adam"] and i["deepspeed_shm_comm"], g'
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-deps --no-index /tmp/dist/*.whl && rm -r /tmp/dist
USER 1000:1000
CMD ["python", "-m", "lorafinetune.operator"]
