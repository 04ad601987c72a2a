# syntax=docker/dockerfile:1
# The STS container image:  docker build -t <registry>/sts:0.1.0 .   (BuildKit: Docker 23+ default)
#
# Stage "build" turns the project and every dependency into wheels; stage "runtime" installs only
# those wheels on a clean slim Python, runs as an unprivileged numeric user and holds no compiler and
# no pip cache. The image is made for a read-only root file system: state (SQLite, audit log,
# generated development keys) lives in the /var/lib/sts volume; the configuration, the Cedar
# policies and the provisioned signing keys are mounted (helm/sts, docs/kubernetes.md).
#
#   docker run --read-only -v "$PWD/config.yaml:/etc/sts/config.yaml:ro" -p 8443:8443 <image>
#
# The config must bind 0.0.0.0 (listen.host) to be reachable from outside the container.
# Pin the base by digest in your own builds (python:3.11-slim-trixie@sha256:...) for reproducible images.

ARG PYTHON_IMAGE=python:3.11-slim-trixie

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps everything else out of the context).
COPY pyproject.toml README.md ./
COPY sts/ sts/
COPY spire/ spire/
# Every dependency publishes manylinux wheels for CPython 3.11, so no compiler is installed here
# either: should one ever need building from source, this step fails instead of growing a toolchain.
# The distribution is spiffe-sts; the server's dependencies are its "server" extra (the base
# install is the client and verifier libraries only).
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels '.[server]'

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sts" \
      org.opencontainers.image.description="SPIFFE workload-identity token exchange server (RFC 8693)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# A fixed numeric UID/GID so Kubernetes can check runAsNonRoot without reading /etc/passwd; the
# chart's securityContext uses the same numbers (helm/sts/values.yaml).
RUN groupadd --system --gid 10001 sts \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sts --no-create-home \
      --shell /usr/sbin/nologin sts \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/sts \
 && install -d -m 0755 /etc/sts
# The wheels come in through a bind mount, so they never become a layer of this image; --no-index
# means nothing but the wheels built above is installed. pip compiles the bytecode at install time,
# so nothing is written under site-packages at run time (read-only root).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    set -- /wheels/spiffe_sts-*.whl \
 && python -m pip install --no-cache-dir --no-index --find-links=/wheels "$1[server]" \
 && sts --help > /dev/null
USER 10001:10001
WORKDIR /var/lib/sts
VOLUME ["/var/lib/sts"]
EXPOSE 8443
# Liveness only (/readyz also needs trust bundles and the store), with Python's urllib: no curl in the
# image, no proxy whatever the environment says. With listen.tls set HEALTHCHECK_URL=https://127.0.0.1:8443/healthz
# (the certificate is not checked: this only asks whether the process answers on loopback).
# Kubernetes ignores this and uses the chart's probes.
ENV HEALTHCHECK_URL=http://127.0.0.1:8443/healthz
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, ssl, urllib.request as r; c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE; r.build_opener(r.ProxyHandler({}), r.HTTPSHandler(context=c)).open(os.environ['HEALTHCHECK_URL'], timeout=4)"]
ENTRYPOINT ["sts"]
CMD ["serve", "--config", "/etc/sts/config.yaml"]
