# The two commands of the README: `make serve` and `make test`. Both set up everything
# they need on a fresh machine (a virtual environment in .venv from requirements-dev.txt).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: serve test train tsne bench clean

$(BIN)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

serve: $(BIN)/.installed
	BIND=0.0.0.0:$(PORT) $(BIN)/gunicorn wsgi:app

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

train: $(BIN)/.installed
	$(BIN)/python -m training.train $(ARGS)

tsne: $(BIN)/.installed
	$(BIN)/python -m training.tsne $(ARGS)

bench: $(BIN)/.installed
	$(BIN)/python -m bench.train && $(BIN)/python -m bench.serve

clean:
	rm -rf $(VENV) .cache .pytest_cache
