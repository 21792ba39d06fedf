# syntax=docker/dockerfile:1
# One image for every joulepool component: `joulepool <command>` (operator,
# extender, node-agent, device-plugin, fake-engine, ...).
#
#   docker build -t joulepool:dev .
#   docker run --rm joulepool:dev --help

# the Debian release is pinned: the final stage installs bookworm's grpc++ and
# protobuf runtime packages by name (libgrpc++1.51, libprotobuf32), which the next
# release renames; the unpinned python:3.11-slim tag follows Debian's newest release
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: install the package and its dependencies into a venv ----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# the endpoint picker's compiled ext_proc front end (native/build.py): a C++ compiler,
# grpc++, protobuf and their code generators, as native/debian-packages.txt lists them
# for `make native` too (the slim base is Debian's; its Python is not, so no headers)
COPY native/debian-packages.txt native/
RUN apt-get update \
 && apt-get install -y --no-install-recommends $(grep -v '^#' native/debian-packages.txt) \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/joulepool
# dependencies first (cached while only the sources change)
COPY pyproject.toml README.md ./
RUN mkdir -p src/joulepool && touch src/joulepool/__init__.py \
 && /opt/joulepool/bin/pip install . \
 && /opt/joulepool/bin/pip uninstall -y joulepool
COPY src ./src
COPY native ./native
RUN /opt/joulepool/bin/python native/build.py --require \
 && /opt/joulepool/bin/pip install --no-deps . \
 && /opt/joulepool/bin/joulepool --help >/dev/null

# ---- runtime: the venv on a clean slim base, as a non-root user -----------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="joulepool" \
      org.opencontainers.image.description="Energy- and carbon-aware LLM inference pools on heterogeneous GPU clusters" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/joulepool/joulepool"
# grpc++ and protobuf's shared libraries, for the native ext_proc front end
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgrpc++1.51 libprotobuf32 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 65532 joulepool \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin joulepool
COPY --from=build /opt/joulepool /opt/joulepool
RUN /opt/joulepool/bin/python -c "import joulepool.router._eppnative"
ENV PATH=/opt/joulepool/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
# the chart runs every container with a read-only root filesystem and /tmp
# as its only writable directory
WORKDIR /tmp
USER 65532:65532
ENTRYPOINT ["joulepool"]
CMD ["--help"]
