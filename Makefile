# Two commands on a fresh machine (see README.md):
#   make demo   - the main job: the CPU quickstart (raw text -> baseline vs EDL -> report)
#   make test   - lint + the whole test suite (what CI runs)
# Both create/reuse the virtual environment $(VENV) and install what they need.
# make quickstart: raw text -> corpus -> tokenizer -> labelled data -> baseline and EDL runs ->
# report (docs/quickstart.md); QUICKSTART_ARGS="--labels random coarse" adds the controls.

SHELL := /bin/bash
VENV ?= .venv
# First Python >= 3.12 found: $PYTHON, python3.12, pyenv's, system paths.
PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 \
	/usr/local/bin/python3.12 /usr/bin/python3.12 python3; do \
	"$$p" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))' >/dev/null 2>&1 \
	&& { echo "$$p"; break; }; done)
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
QUICKSTART_ARGS ?=

.PHONY: venv demo tiny quickstart test lint format clean gpu-wheelhouse gpu-check

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: no Python >= 3.12 found; set PYTHON=/path/to/python3.12" >&2; exit 1; }
	@echo "[setup] creating $(VENV) with $(PYTHON) and installing requirements (first time: minutes)"
	@test -x $(VENV)/bin/python || "$(PYTHON)" -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -r requirements.txt -e '.[test]'
	@touch $(STAMP)

demo: quickstart

tiny: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash examples/pretrain_tiny_moe_cpu.sh

quickstart: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" python -m megatron_edl.demo.quickstart $(QUICKSTART_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# pytest exits 5 when it collects no test: treat that as success (and say so).
test: lint
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

# GPU check (docs/install.md): build the wheel folder here (PyPI access), copy the repository
# with it to a GPU machine (torch, no network), run `make gpu-check` there.
GPU_WHEELHOUSE ?= gpu-wheelhouse
GPU_CHECK_OUT ?= gpu-check-results
GPU_CHECK_ARGS ?=

gpu-wheelhouse: $(STAMP)
	$(VENV)/bin/python tools/gpu_check.py --build-wheelhouse $(GPU_WHEELHOUSE)

# Runs with the machine's python (its torch); set PYTHON_GPU to choose another interpreter.
PYTHON_GPU ?= python3
gpu-check:
	$(PYTHON_GPU) tools/gpu_check.py --wheelhouse $(GPU_WHEELHOUSE) --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
