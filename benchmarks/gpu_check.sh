#!/usr/bin/env bash
# Everything GPU-side in one run of at most 9 minutes: install the carried wheels, run the gpu test tier,
# run the GPU benchmark, write every table and log into one results folder.
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR            # on the GPU machine (the device tool: RESULTS_DIR=$OUT)
#   bash benchmarks/gpu_check.sh --dry-run RESULTS_DIR  # on a CPU: the same steps, the tiny benchmark config
#
# Wheels: the GPU image has torch + CUDA, transformers, peft, accelerate, no datasets / TRL / Liger and no
# network. benchmarks/fetch_gpu_wheels.sh downloads what is missing into .whl/ (git-ignored) here; the
# device call carries .whl. Without .whl the script runs with what is installed (TRL / Liger rows then
# say "not installed").
set -uo pipefail

DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; shift; fi
OUT="${1:?usage: gpu_check.sh [--dry-run] RESULTS_DIR}"
mkdir -p "$OUT"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
if [ -n "$DRY" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
START=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_check.log"; }

# 1. wheels (into a private folder on PYTHONPATH: the image's own packages stay as they are)
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ -z "$DRY" ]; then
  log "installing $(ls .whl/*.whl | wc -l) carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$OUT/gpu_check.log" 2>&1 || log "wheel install failed (see this log)"
  export PYTHONPATH="/tmp/site:$REPO/src:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$REPO/src:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export PEFTKIT_HOME="${PEFTKIT_HOME:-/tmp/peftkit_home}" TOKENIZERS_PARALLELISM=false
"$PY" - >"$OUT/environment.txt" 2>&1 <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
for name in ("transformers", "peft", "accelerate", "datasets", "pyarrow", "huggingface_hub", "tokenizers", "trl", "liger_kernel", "flash_attn", "bitsandbytes",
             "deepspeed", "triton"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:
        print(name, "not installed", f"({type(e).__name__})")
import torch.nn.attention as a
print("torch varlen attention:", importlib.util.find_spec("torch.nn.attention.varlen") is not None)
EOF
log "environment: $(tr '\n' ';' < "$OUT/environment.txt")"

# 2. the gpu test tier's kernels and precision (skipped with its reason on a CPU), at most 120 s
log "pytest tests/gpu/test_cuda.py"
timeout 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" tests/gpu/test_cuda.py \
  >"$OUT/gpu_tests.txt" 2>&1
log "gpu tests: exit $? — $(tail -1 "$OUT/gpu_tests.txt")"

# 3. the benchmark, leaving 200 s of the 9 minutes for step 4 (approaches not started within budget are skipped)
LEFT=$(( 330 - ($(date +%s) - START) ))
log "benchmarks/gpu_speed.py (budget ${LEFT}s)"
timeout $(( LEFT + 60 )) "$PY" benchmarks/gpu_speed.py $DRY --out "$OUT" --scratch /tmp/gpu_speed_scratch \
  --budget $(( LEFT > 60 ? LEFT : 60 )) >"$OUT/gpu_speed.txt" 2>&1
log "gpu_speed: exit $?"
rm -rf /tmp/gpu_speed_scratch

# 4. FSDP2 / DeepSpeed train, resume after SIGKILL, export (issue 19), in what is left
LEFT=$(( 530 - ($(date +%s) - START) ))
log "pytest tests/gpu/test_scale.py (${LEFT}s)"
timeout $(( LEFT > 30 ? LEFT : 30 )) "$PY" -m pytest -m gpu -q -p no:cacheprovider \
  --junitxml="$OUT/gpu_scale_tests.xml" tests/gpu/test_scale.py >"$OUT/gpu_scale_tests.txt" 2>&1
log "scale tests: exit $? — $(tail -1 "$OUT/gpu_scale_tests.txt")"
log "done; tables in $OUT/gpu_speed.md, tests in $OUT/gpu_tests.txt and $OUT/gpu_scale_tests.txt"
