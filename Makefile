# Two commands on a fresh machine:  `make demo` (the main job on the embedded tiny default) and `make test`.
# Both create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build this project's machines carry on disk; override for another CUDA/CPU build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export RAY_USAGE_STATS_ENABLED := 0
export AWS_EC2_METADATA_DISABLED := true

.PHONY: install demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) jobs/demo.py

test: install
	$(PY) -m pytest -q

# The library alone, no Ray cluster (a few minutes): for the edit-test loop. CI runs `make test`.
test-fast: install
	$(PY) -m pytest -q -m "not cluster"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/inference.py --quick

clean:
	rm -rf outputs runs .pytest_cache
