# Developer shortcuts. Every target runs from the repository root with the project's venv.
PY := .venv/bin/python
SRC := nbdserver agent/nbd_agent operator/nbd_operator api/nbd_api bench tests scripts

.PHONY: dev lint test test-unit test-interop test-kernel test-controlplane bench proto chart ci

dev:            ## Debian packages + .venv with the project and its dev extras
	./scripts/setup.sh

lint:           ## ruff, mypy and the import layering contracts
	.venv/bin/ruff check $(SRC)
	.venv/bin/ruff format --check $(SRC)
	.venv/bin/mypy nbdserver agent/nbd_agent operator/nbd_operator api/nbd_api
	.venv/bin/lint-imports

test:           ## the whole suite, exactly as README and CI run it
	$(PY) -m pytest

test-unit:
	$(PY) -m pytest tests/unit

test-interop:
	$(PY) -m pytest tests/interop

test-kernel:    ## tier 3: a real kernel (user-mode-linux, probed: tests/kernel/kernels.py) with nbd.ko
	$(PY) -m pytest tests/kernel

test-controlplane:
	$(PY) -m pytest tests/controlplane

bench:          ## nbdserver against qemu-nbd, nbdkit and nbd-server, side by side
	$(PY) -m bench

proto:          ## regenerate the CSI gRPC code from its .proto
	$(PY) -m nbd_agent.csi.generate

chart:          ## copy the CRD from crds/ into the chart
	$(PY) scripts/sync_chart_crds.py

ci:
	bash .ci/run
