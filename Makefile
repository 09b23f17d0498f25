# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv, install evspec with pinned ranges, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all

.PHONY: demo test setup clean

setup: $(STAMP)

# torch: where the machine's python already has torch (e.g. a CUDA build on a GPU node)
# the venv sees it through --system-site-packages and keeps it; otherwise take the
# CPU wheel that lies on local disk here (pip resolves torch==2.13.0 to it) instead
# of a multi-GB CUDA download.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) \
		$$($(PYTHON) -c "import torch" 2>/dev/null && echo --system-site-packages)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --profile profiles/local --cores $(CORES)
	$(BIN)/snakemake --report reports/demo.html
	@echo "Report: reports/demo/index.md (Snakemake's HTML report: reports/demo.html); results under results/demo/."

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf results reports/*/ reports/*.html .snakemake
