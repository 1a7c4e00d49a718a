#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on the GPU machine and cannot download there (no network), in .whl/
# (git-ignored; the device call carries it): the wheels its image lacks, at the versions the CPU suite runs
# (transformers / peft / tokenizers / huggingface_hub as in .venv: the image's transformers 5.17 is older than
# peftkit's lower bound), and the embedded model's tokenizer (the benchmark's models use its token ids;
# the model package itself is 94 MB, too big to carry). About 30 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PY=.venv/bin/python
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for spec in "transformers==$(ver transformers)" "peft==$(ver peft)" "tokenizers==$(ver tokenizers)" \
            "huggingface_hub==$(ver huggingface_hub)" "datasets==$(ver datasets)" "dill==$(ver dill)" \
            "multiprocess==$(ver multiprocess)" "gguf==$(ver gguf)" "trl==1.16.0" "liger-kernel==0.8.5"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec"
done
"$PY" - <<'PY'
import shutil
from pathlib import Path
from peftkit.model import resolve_model
src, dst = Path(resolve_model("smollm2-135m-instruct")), Path(".whl/smollm2_tokenizer")
dst.mkdir(exist_ok=True)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json", "generation_config.json"):
    if (src / name).is_file():
        shutil.copy(src / name, dst / name)
PY
du -sh .whl
