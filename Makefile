# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv once (re-created only when pyproject.toml changes) and are quick afterwards.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Torch is installed first and pinned: on CPU-only machines a bare `torch` requirement can pull a
# multi-GB CUDA build from the index; these releases are the verified pair
# (the newest that pip takes from the wheels on the development machine's disk).
TORCH  := torch==2.14.1 torchvision==0.29.1
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 YOLO_OFFLINE=1 YOLO_AUTOINSTALL=0 \
           HF_HUB_DISABLE_TELEMETRY=1 WANDB_DISABLED=true TOKENIZERS_PARALLELISM=false

.PHONY: venv test test-fast demo lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q

test-fast: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q -m 'not slow'

demo: $(STAMP)
	$(OFFLINE) $(PY) recipes/demo.py

lint: $(STAMP)
	$(PY) -m ruff check hf_tempbalance recipes tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/esd_speed.py

clean:
	rm -rf $(VENV) .pytest_cache
