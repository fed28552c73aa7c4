# privrank server image: slim base, non-root, the same package the README installs.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY server ./server
COPY ranking ./ranking
COPY features ./features
COPY jobs ./jobs
RUN python -m venv /opt/privrank \
    && /opt/privrank/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/privrank/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --system --create-home --home-dir /home/privrank privrank \
    && mkdir /data && chown privrank /data
COPY --from=build /opt/privrank /opt/privrank
ENV PATH=/opt/privrank/bin:$PATH \
    PRIVRANK_DATA_DIR=/data \
    PRIVRANK_LISTEN=0.0.0.0:50051 \
    PRIVRANK_METRICS_LISTEN=0.0.0.0:9464 \
    NUMBA_CACHE_DIR=/data/.numba-cache \
    PYTHONUNBUFFERED=1
USER privrank
WORKDIR /data
VOLUME /data
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["privrank", "healthcheck", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["privrank"]
CMD ["serve"]
