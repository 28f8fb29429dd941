# Refinery GPU worker: training flows on the `gpu` work pool (CUDA build of the pinned torch).
# The base image pinned by digest (a tag can be re-pointed); refresh deliberately with
# `docker buildx imagetools inspect nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04`.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04@sha256:ac55d124da4882b497f732d8dfd9a702d5447a5f29d08d56da6f64f0a1eb34bc
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    REFINERY_PROJECT_DIR=/opt/refinery REFINERY_WORKDIR=/data/refinery
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/* && python3.11 -m venv /venv
ENV PATH=/venv/bin:$PATH
WORKDIR /opt/refinery
COPY pyproject.toml constraints.txt README.md ./
COPY flows ./flows
COPY tasks ./tasks
COPY deployments ./deployments
# PyPI's Linux wheel of torch==2.13.0 is the CUDA build; then the project and every optional feature
# (QLoRA's bitsandbytes, s3, ...) at the lock's versions.
RUN pip install torch==2.13.0 && pip install -c constraints.txt -e '.[all,scale]'
# Run as an unprivileged user: the code stays root-owned and read-only to it; it writes only /data
# (the shared volume, created here so a fresh named volume inherits the ownership) and its home.
RUN useradd --create-home --uid 10001 --user-group refinery \
 && mkdir -p /data/refinery /data/prefect-results && chown -R refinery:refinery /data
USER refinery
VOLUME /data
CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process"]
