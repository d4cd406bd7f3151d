# Two commands do all set-up on a fresh machine:
#   make train   create .venv, install what training needs, train the default experiment
#   make test    create .venv, install that plus the dev extras (pytest, ruff, the Optuna
#                sweeper and SLURM launcher the tests cover), run the suite (SLOW=1 adds slow tests)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
ARGS ?=
PYTEST_ARGS ?=
SLOW ?= 0

ifeq ($(SLOW),1)
MARKERS :=
else
MARKERS := -m "not slow"
endif

.PHONY: install train test test-slow lint format clean audio-data train-audio

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

# extras: dev (tests, lint), sweep (hparams_search=...), slurm (hydra/launcher=slurm)
$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(DEV_STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

# The offline speech of the audio experiments (train.py experiment=audio_rvq): Debian's
# asterisk-core-sounds-en-wav; installed with apt-get when missing (needs root).
ALLISON_DIR := /usr/share/asterisk/sounds/en_US_f_Allison
audio-data:
	@test -d $(ALLISON_DIR) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update && apt-get install -y asterisk-core-sounds-en-wav; \
	  else \
	    echo "missing $(ALLISON_DIR): run 'sudo apt-get install asterisk-core-sounds-en-wav'" >&2; \
	    exit 1; \
	  fi; }

train-audio: $(STAMP) audio-data
	$(PY) train.py experiment=audio_rvq $(ARGS)

test: $(DEV_STAMP)
	$(PY) -m pytest $(MARKERS) $(PYTEST_ARGS)

test-slow: $(DEV_STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(DEV_STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
