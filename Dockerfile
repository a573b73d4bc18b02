# proxyd's container image:  docker build -t proxyd .
#   (podman or buildah: podman build --format docker -t proxyd .  The OCI format they
#   default to has no HEALTHCHECK, so without --format docker it is dropped.)
#   docker run -d -p 127.0.0.1:5000:5000 -v proxyd-cache:/var/cache/proxyd proxyd
# A configuration of your own: mount it over /etc/proxyd/proxyd.toml (read-only).
# No `# syntax=` line: BuildKit would fetch that frontend image first, on every build.

# -- builder: proxyd and its dependencies, installed under /install -----------------
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxyd ./proxyd
RUN pip wheel --wheel-dir /wheels . \
 && pip install --prefix=/install --no-index --find-links=/wheels proxyd

# -- final: the interpreter, proxyd, a user of its own ------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PROXYD_CONFIG=/etc/proxyd/proxyd.toml \
    PROXYD_CACHE_DIR=/var/cache/proxyd \
    PROXYD_LISTEN=0.0.0.0:5000 \
    PROXYD_LOG_FORMAT=json
RUN groupadd --system --gid 10001 proxyd \
 && useradd --system --uid 10001 --gid proxyd --home-dir /var/cache/proxyd \
        --no-create-home --shell /usr/sbin/nologin proxyd \
 && mkdir -p /var/cache/proxyd /etc/proxyd \
 && chown proxyd:proxyd /var/cache/proxyd
COPY --from=builder /install /usr/local
COPY config/proxyd.toml /etc/proxyd/proxyd.toml
USER 10001:10001
VOLUME /var/cache/proxyd
EXPOSE 5000
# `proxyd health` reads the settings `proxyd serve` reads (PROXYD_* set here or by
# `docker run -e`, the config file): it asks /healthz where proxyd listens, over HTTPS
# when PROXYD_TLS_CERT is set; exit 0 healthy, 1 not (the reason in `docker inspect`).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["proxyd", "health"]
ENTRYPOINT ["proxyd"]
CMD ["serve"]
