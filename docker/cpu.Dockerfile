# Refinery CPU worker: data flows (curate, tokenize) on the `cpu` process work pool.
# The base image pinned by digest (a tag can be re-pointed); refresh deliberately with
# `docker buildx imagetools inspect python:3.11-slim`.
FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    REFINERY_PROJECT_DIR=/opt/refinery REFINERY_WORKDIR=/data/refinery
WORKDIR /opt/refinery
COPY pyproject.toml constraints.txt README.md ./
COPY flows ./flows
COPY tasks ./tasks
COPY deployments ./deployments
# CPU build of the pinned torch, then the project and every optional feature (s3, trafilatura,
# Chinese and Japanese segmentation, ...) at the lock's versions (constraints.txt keeps torch too).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install -c constraints.txt -e '.[all,scale]'
# Run as an unprivileged user: the code stays root-owned and read-only to it; it writes only /data
# (the shared volume, created here so a fresh named volume inherits the ownership) and its home.
RUN useradd --create-home --uid 10001 --user-group refinery \
 && mkdir -p /data/refinery /data/prefect-results && chown -R refinery:refinery /data
USER refinery
VOLUME /data
CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process"]
