# algoplane: the gRPC control plane, with redis-server for the embedded default.
# Production points ALGOPLANE_REDIS_URL at a managed Redis (AOF on) and
# ALGOPLANE_DATABASE_URL at PostgreSQL.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY protos ./protos
COPY server ./server
COPY clients ./clients
COPY scripts/gen-protos ./scripts/gen-protos
# The stubs are committed; regenerating them here fails the build if they are stale.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt ".[dev]" \
 && PYTHON=/opt/venv/bin/python scripts/gen-protos --check \
 && /opt/venv/bin/pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 algoplane \
 && mkdir /data && chown algoplane /data
COPY constraints.txt /tmp/constraints.txt
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir -c /tmp/constraints.txt /wheels/*.whl && rm -rf /wheels
USER algoplane
ENV ALGOPLANE_GRPC_ADDR=0.0.0.0:50051 \
    ALGOPLANE_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
VOLUME /data
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-m", "clients.healthcheck", "127.0.0.1:50051"]
STOPSIGNAL SIGTERM
CMD ["algoplane-server"]
