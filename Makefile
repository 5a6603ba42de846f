# The two commands of the README: `make serve` and `make test`. Both set up everything
# they need on a fresh machine, in a virtual environment in .venv: `make serve` installs
# requirements-serve.txt alone (no PyTorch) and Debian's nginx-light, which holds slow
# clients in front of gunicorn; `make test` (and training) everything, requirements-dev.txt.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: serve test train tsne bench clean nginx

$(BIN)/.installed: requirements-serve.txt requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@ $(BIN)/.serve-installed

$(BIN)/.serve-installed: requirements-serve.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-serve.txt
	touch $@

serve: $(BIN)/.serve-installed nginx
	PORT=$(PORT) $(BIN)/python -m deploy.serve

nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  echo "installing nginx-light (Debian), the proxy in front of gunicorn"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends nginx-light >/dev/null; }

# axe-core, which the browser tests inject into pages, from the npm registry (package-lock.json).
node_modules/axe-core/axe.min.js: package.json package-lock.json
	command -v npm >/dev/null 2>&1 && npm ci --no-audit --no-fund --silent || echo "npm not found: the accessibility tests will skip"

test: $(BIN)/.installed node_modules/axe-core/axe.min.js
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
