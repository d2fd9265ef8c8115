# algoplane: the gRPC control plane. `docker compose up` (compose.yaml) runs it with Redis and
# PostgreSQL; alone it falls back to the embedded defaults (its own redis-server and SQLite in
# /data), as `scripts/run` does.

# Build: the stubs are generated here from protos/*.proto (.dockerignore keeps the committed
# ones out of the context), so the image never trusts generated code from the repository.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY constraints.txt ./
RUN python -m venv /opt/gen \
 && /opt/gen/bin/pip install -c constraints.txt grpcio-tools mypy-protobuf
COPY pyproject.toml README.md ./
COPY scripts/gen-protos ./scripts/gen-protos
COPY protos ./protos
RUN PYTHON=/opt/gen/bin/python scripts/gen-protos \
 && test -f protos/algoplane/v1/strategy_pb2_grpc.py
COPY server ./server
COPY clients ./clients
# A non-editable install: the runtime stage takes /opt/venv and nothing else from here.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c constraints.txt .

FROM python:3.11-slim
# redis-server only serves the embedded default; compose.yaml points the server at its own Redis.
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin algoplane \
 && mkdir /data && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ALGOPLANE_GRPC_ADDR=0.0.0.0:50051 \
    ALGOPLANE_METRICS_ADDR=0.0.0.0:9464 \
    ALGOPLANE_LOG_FORMAT=json \
    ALGOPLANE_DATA_DIR=/data
# Numeric, so a runtime that enforces non-root (runAsNonRoot) can verify it without /etc/passwd.
USER 10001:10001
WORKDIR /data
VOLUME /data
EXPOSE 50051 9464
# grpc.health.v1 through the SDK's checker: SERVING only once Redis and the DB answer and
# recovery is done. It dials the port of ALGOPLANE_GRPC_ADDR above; change both together.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-m", "clients.healthcheck", "127.0.0.1:50051"]
# SIGTERM: health NOT_SERVING, streams end UNAVAILABLE, in-flight calls get the grace period.
STOPSIGNAL SIGTERM
CMD ["algoplane-server", "serve"]
