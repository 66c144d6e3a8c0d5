# One image for the operator and the trainer. Non-root (uid 1000, matching the pods' securityContext), pinned
# dependencies from pyproject.toml; torch from PyPI is the CUDA build, so the same image trains on GPUs.
#   operator: python -m lorafinetune.operator        trainer: torchrun -m lorafinetune.trainer (set by the Job)
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HOME=/home/lft
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/lft lft
WORKDIR /opt/lorafinetune
COPY pyproject.toml README.md ./
COPY lorafinetune ./lorafinetune
COPY crds ./crds
RUN pip install ".[train,operator]"

USER 1000:1000
CMD ["python", "-m", "lorafinetune.operator"]
