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

.PHONY: install system-packages demo generate-demo compare test test-fast lint clean

install: $(STAMP)

# Debian packages the suite needs: a real headless Chromium for the server test (pip's browser installers download
# at run time, which offline machines cannot), fonts for contact sheets, `ss` for the loopback-only checks.
# Installed once, as root or through sudo.
SYSTEM_PACKAGES := chromium chromium-driver fonts-dejavu-core iproute2
system-packages:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && command -v ss >/dev/null \
		&& [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
		echo "make system-packages: need root or sudo to apt-get install $(SYSTEM_PACKAGES)" >&2; exit 1; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
		$(SYSTEM_PACKAGES)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install $(TORCH_PINS)
	# deepspeed's build needs the torch installed above, not a fresh one in an isolated build env.
	$(PY) -m pip install --no-build-isolation -e ".[dev]" $(TORCH_PINS)
	$(PY) -c "import torch, torchvision, open_clip; assert '+cpu' not in torch.__version__, torch.__version__"
	# DeepSpeed compiles its CPU communication op on first use: build it now, into the virtualenv, where the training
	# workers look for it (training.engine.deepspeed_engine.use_venv_extensions_dir), so no demo or test pays for it.
	$(PY) -c "from training.engine.deepspeed_engine import use_venv_extensions_dir as use; use(); \
		from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check cluster training shards launch tests
	$(VENV)/bin/ruff format --check cluster training shards launch tests

# The whole suite, as CI runs it: tests/unit (pure logic) and tests/e2e (gloo ranks, DeepSpeed, local Ray heads,
# servers, a headless browser).
test: $(STAMP) system-packages
	$(MAKE) lint
	$(PY) -m pytest tests

# The edit-test loop: unit tests only (no Ray, no DeepSpeed, no servers), a few minutes.
test-fast: $(STAMP)
	$(PY) -m pytest tests/unit -m "not slow" -q

# Synthetic benchmark -> pretraining of the tiny towers on its scene descriptions (cached by a digest of data +
# config) -> shards -> ConText training from those towers on a local Ray (127.0.0.1, 2 workers) -> eval of the final
# checkpoint -> an inference bundle -> a Ray Data index of the val gallery -> one search drawn as runs/demo/search.png.
# The run lands in runs/demo/; running it again resumes (and finds the run already finished).
TOWERS := runs/towers/ContextTiny.safetensors
demo: $(STAMP)
	$(PY) launch/make_synthetic.py
	$(PY) launch/build_shards.py --config configs/tiny_pretrain.yaml
	$(PY) launch/pretrain_towers.py --config configs/tiny_pretrain.yaml pretrain.towers_out=$(TOWERS)
	$(PY) launch/build_shards.py --config configs/tiny.yaml
	$(PY) launch/train.py --config configs/tiny.yaml model.weights_file=$(TOWERS)
	$(PY) launch/eval.py --config configs/tiny.yaml --checkpoint runs/demo/checkpoints/latest
	$(PY) launch/export.py --checkpoint runs/demo/checkpoints/latest --out runs/demo/bundle --overwrite
	$(PY) launch/index.py --config configs/tiny.yaml --bundle runs/demo/bundle --benchmark synthetic \
		--out runs/demo/index --overwrite
	$(PY) launch/search.py --config configs/tiny.yaml --index runs/demo/index --benchmark synthetic --query 1 \
		-k 10 --sheet runs/demo/search.png
	@echo "run directory: runs/demo   (checkpoints/, tensorboard/, eval/, bundle/, index/)"
	@echo "tensorboard --logdir runs/demo/tensorboard"
	@echo "search sheet:  runs/demo/search.png"
	@echo "serve it:      .venv/bin/python launch/serve.py --index runs/demo/index   (then open http://127.0.0.1:8000)"

# The data pipeline offline: the synthetic train pairs, described by the scene oracle (a VLM stand-in on 127.0.0.1,
# 10 % faults), become data/synthetic_R (CIRR_R layout + manifest + trees). The oracle is stopped by its pid.
generate-demo: $(STAMP)
	test -f data/synthetic/objects.json || $(PY) launch/make_synthetic.py
	mkdir -p runs && rm -f runs/oracle.port
	$(PY) launch/scene_oracle.py --root data/synthetic --port 0 --port-file runs/oracle.port --fault-rate 0.1 & \
	oracle=$$!; trap 'kill $$oracle' EXIT; \
	for i in $$(seq 300); do [ -s runs/oracle.port ] && break; kill -0 $$oracle || exit 1; sleep 0.2; done; \
	$(PY) launch/generate.py --config configs/generate_synthetic.yaml \
		generate.endpoint=http://127.0.0.1:$$(cat runs/oracle.port)/v1

# The other methods on the demo's data and towers (DESIGN section 13): phi (textual inversion), TisCIR (MSMP, then
# FGIA) trained on the same Ray + DeepSpeed job with the towers frozen, then one eval run scoring every method beside
# the demo's ConText checkpoint. CVSI's captions and edits come from the scene oracle (stopped by its pid), cached in
# runs/cvsi_cache, so a rerun asks it nothing. Runs `make demo` first when its outputs are missing.
METHODS := context,image_only,text_only,sum,phi,cvsi,tiscir
compare: $(STAMP)
	test -f $(TOWERS) -a -f runs/demo/checkpoints/latest || $(MAKE) demo
	$(PY) launch/train.py --config configs/phi_tiny.yaml model.weights_file=$(TOWERS)
	$(PY) launch/train.py --config configs/tiscir_msmp_tiny.yaml model.weights_file=$(TOWERS)
	$(PY) launch/train.py --config configs/tiscir_tiny.yaml
	mkdir -p runs && rm -f runs/oracle.port
	$(PY) launch/scene_oracle.py --root data/synthetic --port 0 --port-file runs/oracle.port & \
	oracle=$$!; trap 'kill $$oracle' EXIT; \
	for i in $$(seq 300); do [ -s runs/oracle.port ] && break; kill -0 $$oracle || exit 1; sleep 0.2; done; \
	endpoint=http://127.0.0.1:$$(cat runs/oracle.port)/v1; \
	$(PY) launch/eval.py --config configs/tiny.yaml --checkpoint runs/demo/checkpoints/latest --methods $(METHODS) \
		methods.phi.checkpoint=runs/phi_tiny/checkpoints/latest \
		methods.tiscir.checkpoint=runs/tiscir_tiny/checkpoints/latest \
		methods.cvsi.captioner_endpoint=$$endpoint methods.cvsi.editor_endpoint=$$endpoint

clean:
	rm -rf $(VENV) data/shards runs
