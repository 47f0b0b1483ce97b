# alter-serve on GPU: the package with the `gpu` extra (vLLM with CUDA, from PyPI).
#
#   docker compose build            (see docker-compose.yml and docs/deploy.md)
#
# The base is plain Python, not a CUDA image: the vLLM and torch wheels bring their own CUDA
# runtime libraries, and the NVIDIA Container Toolkit mounts the host's driver at run time.
# EXTRAS picks the pip extras: gpu (vLLM with CUDA) and postgres (the psycopg driver, for several
# replicas sharing one registry, see docs/deploy.md).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm

ARG EXTRAS=gpu,postgres

# Triton (used by vLLM's kernels) compiles small launcher stubs with a C compiler at first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Models are mounted as local folders: never reach for the Hugging Face hub at run time.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /app
COPY pyproject.toml README.md* ./
COPY alter_serve ./alter_serve
COPY train ./train
COPY configs ./configs
# Editable, so the package's non-Python files (alter_serve/api/static/) are found where they are:
# pyproject.toml declares no package data, so a regular install would leave them out.
RUN pip install -e ".[${EXTRAS}]"

# An unprivileged user owns the data and cache volumes; the folders are created here so that a
# fresh named volume inherits this ownership on first mount.
RUN useradd --create-home --uid 1000 alter \
    && mkdir -p /data /bundles /home/alter/.cache \
    && chown alter:alter /data /home/alter/.cache
USER alter

EXPOSE 8000
# /ready turns 200 once the vLLM engine has loaded the model and every registered view (503 before).
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=5 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4).status != 200)"

ENTRYPOINT ["alter-serve"]
CMD ["serve", "--config", "/app/configs/serve-gpu.yaml"]
