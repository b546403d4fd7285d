# The two commands of the README: `make demo` and `make test`. Both build .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Pinned so pip can never pick the local `torch-2.13.0+cpu` wheel, whose torchvision import fails.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export MASTER_ADDR := 127.0.0.1
export GLOO_SOCKET_IFNAME := lo

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install $(TORCH_PINS)
	# deepspeed's build needs the torch installed above, not a fresh one in an isolated build env.
	$(PY) -m pip install --no-build-isolation -e ".[dev]" $(TORCH_PINS)
	$(PY) -c "import torch, torchvision, open_clip; assert '+cpu' not in torch.__version__, torch.__version__"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check cluster training shards launch tests

test: $(STAMP)
	$(MAKE) lint
	$(PY) -m pytest tests

# Synthetic benchmark -> shards -> training on a local Ray (127.0.0.1, 2 workers) -> eval of the final checkpoint.
# The run lands in runs/demo/; running it again resumes (and finds the run already finished).
demo: $(STAMP)
	$(PY) launch/make_synthetic.py
	$(PY) launch/build_shards.py --config configs/tiny.yaml
	$(PY) launch/train.py --config configs/tiny.yaml
	$(PY) launch/eval.py --config configs/tiny.yaml --checkpoint runs/demo/checkpoints/latest
	@echo "run directory: runs/demo   (checkpoints/, tensorboard/, eval/)"
	@echo "tensorboard --logdir runs/demo/tensorboard"

clean:
	rm -rf $(VENV) data/shards runs
