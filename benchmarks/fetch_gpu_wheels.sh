#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on the GPU machine and cannot download there (no network), in .whl/
# (git-ignored; the device call carries it): the wheels its image lacks, at the versions the CPU suite runs
# (transformers / peft as in .venv: the image's transformers 5.17 is older than peftkit's lower bound; the image's
# tokenizers 0.23.2 and huggingface_hub 1.33 satisfy transformers 5.24). datasets 5.2 needs pyarrow >= 24: if
# environment.txt there shows an older pyarrow, carry pyarrow too (42 MB: leave liger / deepspeed out of that call).
# Also the embedded model's tokenizer (the benchmark's models use its token ids;
# the model package itself is 94 MB, too big to carry), and a DeepSpeed wheel built here. About 25 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PY=.venv/bin/python
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for spec in "transformers==$(ver transformers)" "peft==$(ver peft)" "datasets==$(ver datasets)" "dill==$(ver dill)" \
            "multiprocess==$(ver multiprocess)" "gguf==$(ver gguf)" "trl==1.16.0" "liger-kernel==0.8.5" \
            "hjson==3.1.0" "pydantic==2.12.5" "pydantic-core==2.41.5" "annotated-types==0.7.0" \
            "typing-inspection==0.4.2"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec"
done
# DeepSpeed publishes no wheel: build a pure-Python one (ops compile on first use there; needs the CPU torch here)
if ! ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
fi
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
