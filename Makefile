PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck imports crds bench clean k8s-deps monitoring-deps native

## A fresh Debian has python3 without its venv module (python3-venv), a minimal one no
## python3 at all: as root with apt, they are installed here when `python3 -m venv` fails.
$(STAMP): pyproject.toml
	@$(PY) -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing python3 python3-venv with apt-get ($(PY) -m venv failed)"; \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	        --no-install-recommends -o DPkg::Lock::Timeout=300 python3 python3-venv; } \
	      >/dev/null || echo "python3 python3-venv could not be installed"; \
	  fi; \
	  $(PY) -m venv $(VENV); }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

## The main job: the simulator on its default cluster, trace and load (0.5 of capacity),
## every policy, over DEMO_DURATION simulated seconds: 300 = one planning step, about a
## minute of CPU (the CLI's default window for this cluster is 600 s).
DEMO_DURATION ?= 300
demo: $(STAMP)
	$(BIN)/joulepool simulate --duration $(DEMO_DURATION)

## The real control plane of tests/realk8s (../shared/k8s, when present) needs etcd:
## as root with apt, install Debian's etcd-server once here (not in parallel inside
## each test session); without it those tests skip and say why.
K8S_LOCAL ?= ../shared/k8s
k8s-deps:
	@if [ -f "$(K8S_LOCAL)/up.sh" ] && ! command -v etcd >/dev/null 2>&1 \
	    && [ ! -x /usr/bin/etcd ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing etcd-server with apt-get for tests/realk8s"; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      --no-install-recommends -o DPkg::Lock::Timeout=300 etcd-server; } >/dev/null \
	    || echo "etcd-server could not be installed: tests/realk8s will skip"; \
	fi

## promtool and prometheus (Debian's 'prometheus' package) check and unit-test the
## chart's alert rules and evaluate the dashboard's queries against live components
## (tests/chart/test_chart_monitoring.py, tests/integration/test_prometheus_dashboard.py):
## as root with apt, installed once here; without them those tests skip and say why.
monitoring-deps:
	@if ! command -v promtool >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing prometheus (promtool) with apt-get for the monitoring tests"; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      --no-install-recommends -o DPkg::Lock::Timeout=300 prometheus; } >/dev/null \
	    || echo "prometheus could not be installed: the promtool/Prometheus tests will skip"; \
	fi

## The endpoint picker's compiled ext_proc front end (native/eppnative.cc, C++ grpc++;
## `joulepool router --picker-front-end native`, the default once built), built in place
## by native/build.py. As root with apt, its compiler, grpc++ and protobuf packages (and
## Python's headers for Debian's python3), as `native/build.py --apt-missing` lists them,
## are installed once here; where they cannot be, it is not built: the router serves the
## Python front end and the native front end's tests skip, saying why.
native: $(STAMP)
	@pkgs="$$($(BIN)/python native/build.py --apt-missing)"; \
	if [ -n "$$pkgs" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $$pkgs with apt-get for the native ext_proc front end"; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      --no-install-recommends -o DPkg::Lock::Timeout=300 $$pkgs; } >/dev/null \
	    || echo "$$pkgs could not be installed: the native front end will not be built"; \
	fi
	$(BIN)/python native/build.py

## The whole test suite, lint and type check included.
test: $(STAMP) k8s-deps monitoring-deps native lint typecheck imports
	$(BIN)/pytest -q

## ruff over every Python file of the repository.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts native

## mypy (files and strictness: pyproject.toml).
typecheck: $(STAMP)
	$(BIN)/mypy

## The import graph between joulepool's packages, against the layer contracts (pyproject).
imports: $(STAMP)
	$(BIN)/lint-imports

crds: $(STAMP)
	$(BIN)/joulepool crds --out crds

bench: $(STAMP)
	$(BIN)/joulepool bench all

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	rm -f src/joulepool/router/_eppnative*.so
