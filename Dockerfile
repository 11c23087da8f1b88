# syntax=docker/dockerfile:1
# The audit worker image: `audit-worker run` with health and metrics on port 8080 and the HTTP
# intake on 8081 (separate listeners), as uid/gid 10001, on a read-only
# root filesystem with /tmp as the only writable place (the Helm chart mounts an emptyDir).
#
#   docker build -t audit-worker:0.1.0 .
#   docker run --read-only --tmpfs /tmp --user 10001:10001 -p 8080:8080 -p 8081:8081 \
#     -e AUDIT_DATABASE_URL=... -e AUDIT_REDIS_URL=... audit-worker:0.1.0
#
# Pin the base image by digest in your registry mirror (…-slim-bookworm@sha256:…).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: install the package and its wheels into a virtualenv ------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/audit
WORKDIR /src
# Dependencies first (cached while only the source changes): every one ships manylinux
# wheels (asyncpg, hiredis, orjson, cryptography), so no compiler is needed.
COPY pyproject.toml README.md ./
RUN mkdir -p src/audit_worker src/auditctl \
 && touch src/audit_worker/__init__.py src/auditctl/__init__.py \
 && /opt/audit/bin/pip install . \
 && /opt/audit/bin/pip uninstall -y audit-kit
COPY src ./src
# Byte-compile now: at run time the root filesystem is read-only and nothing is written.
RUN /opt/audit/bin/pip install --no-deps . \
 && /opt/audit/bin/python -m compileall -q -j 0 /opt/audit/lib \
 && /opt/audit/bin/audit-worker --help > /dev/null

# ---- runtime: the virtualenv, a non-root user, nothing else ----------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="audit-worker" \
      org.opencontainers.image.description="Tamper-evident healthcare audit log worker" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 audit \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin audit
COPY --from=build /opt/audit /opt/audit
# The RDS global CA bundle, the default of AUDIT_DATABASE_CA_FILE (audit_worker.tls): the
# database URL says sslmode=verify-full, and HOME=/tmp holds no ~/.postgresql/root.crt.
# Pinned by SHA-256 (bundle of 108 CA certificates, 165,408 bytes, as AWS published it in
# 2025): when AWS changes the bundle this step fails with a checksum mismatch, and the
# pin is updated after review (docs/guides/deployment-patterns.md, "TLS to RDS and
# ElastiCache"). ADD from a URL writes mode 0600: --chmod lets uid 10001 read it.
# Redis (rediss://) uses the system trust store of the base image (ca-certificates).
ADD --checksum=sha256:e5bb2084ccf45087bda1c9bffdea0eb15ee67f0b91646106e466714f9de3c7e3 \
    --chmod=0444 \
    https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem \
    /etc/ssl/certs/rds-global-bundle.pem
# AUDIT_LOCAL_KEY_DIR is only read by the local key backend (dev): ephemeral under /tmp.
# Production uses AUDIT_KEY_BACKEND=kms and keeps no key material in the container.
ENV PATH=/opt/audit/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    AUDIT_HTTP_PORT=8080 \
    AUDIT_INTAKE_PORT=8081 \
    AUDIT_LOG_FORMAT=json \
    AUDIT_LOCAL_KEY_DIR=/tmp/audit-keys
WORKDIR /opt/audit
USER 10001:10001
EXPOSE 8080 8081
# SIGTERM: the worker finishes the batch in hand, acknowledges it, signs a final tree head
# and exits within AUDIT_SHUTDOWN_GRACE_SECONDS (the chart's terminationGracePeriodSeconds
# is that plus 10 s).
STOPSIGNAL SIGTERM
# Kubernetes uses its own probes (/livez, /readyz); this is for plain Docker.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["audit-worker", "health", "livez", "--output", "text"]
CMD ["audit-worker", "run"]
