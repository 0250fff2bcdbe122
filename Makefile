# make demo : install into .venv, then run the pipeline on the default data
# make test : install into .venv, then run the test suite
# A GPU site picks its own torch build, e.g.  make demo TORCH_SPEC="torch==2.8.0 --index-url <your index>"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -q

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# reinstall only when the install description changes
$(STAMP): setup.py | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m monai_histodiff demo --output_dir demo_output

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf demo_output .pytest_cache
