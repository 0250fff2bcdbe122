# make demo : install into .venv, then run the pipeline on the default data
# make demo-tissue : the same demo on real H&E tiles: TISSUE (default: the shared lung tiles), or with
#                    DOWNLOAD=kather2016 the Kather 2016 texture set fetched from Zenodo (258 MB, checksum checked)
# make test : install into .venv, then run the test suite
# make test-monailabel : install MONAI Label into .venv-monailabel, then run tests/monailabel (the sample app)
# A GPU site picks its own torch build, e.g.  make demo TORCH_SPEC="torch==2.8.0 --index-url <your index>"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -q

TISSUE ?= ../shared/data/histology/lc25000_lung
DOWNLOAD ?=

.PHONY: demo demo-tissue test test-monailabel install clean

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

demo-tissue: $(STAMP)
	$(PY) -m monai_histodiff demo --output_dir demo_tissue_output \
		$(if $(DOWNLOAD),--download $(DOWNLOAD) --data_root data,--dataset_dir $(TISSUE))

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# MONAI Label imports torchvision, so it gets its own environment. monailabel 0.8.5 accepts MONAI >= 1.4 but its full
# requirements pull sam2, mlflow, openslide, ...: it is installed --no-deps with the packages its imports need, pydicom
# kept < 3 for pydicom-seg (and dicomweb-client / pynetdicom releases that accept it).
ML_VENV ?= .venv-monailabel
ML_PY := $(ML_VENV)/bin/python
ML_STAMP := $(ML_VENV)/.installed
ML_DEPS := "monai[ignite,pillow,tqdm,fire]==1.6.1" fastapi uvicorn pydantic pydantic-settings python-dotenv \
	python-multipart httpx schedule timeloop expiringdict expiring_dict cachetools watchdog "pydicom>=2.4.4,<3" \
	pydicom-seg "pynetdicom==2.0.2" "dicomweb-client[gcp]==0.59.1" pynrrd "itk>=5.3" girder-client numpymaxflow ninja \
	psutil requests requests-toolbelt pyyaml filelock passlib pyjwt bcrypt shapely einops scikit-learn scipy \
	pytest pytest-timeout

$(ML_STAMP): setup.py
	test -x $(ML_PY) || $(PYTHON) -m venv $(ML_VENV)
	$(ML_PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(ML_PY) -m pip install --no-deps monailabel==0.8.5
	$(ML_PY) -m pip install $(ML_DEPS)
	$(ML_PY) -m pip install -e .
	@touch $(ML_STAMP)

test-monailabel: $(ML_STAMP)
	$(ML_PY) -m pytest tests/monailabel tests/data/test_transforms.py $(PYTEST_ARGS)  # the venv has ITK: also checks the ITK reader

clean:
	rm -rf demo_output demo_tissue_output .pytest_cache
