#!/usr/bin/env bash
# Issue 3's GPU measurements (README "Performance") in as few device calls as possible.
#
# The GPU machine has torch, transformers, accelerate, typer, rich and safetensors but no diffusers, and nothing can
# be fetched there. Here, once per session, from the repository root:
#     scripts/device_bench.sh fetch          # diffusers and peft wheels (constraints.txt's versions) into .whl/
# then one device call per part (each well inside the 10-minute limit of a call):
#     run(command="bash scripts/device_bench.sh sd15-train", carry=[".whl"], timeout_s=600)
#     run(command="bash scripts/device_bench.sh sd15-prior", carry=[".whl"], timeout_s=600)
#     run(command="bash scripts/device_bench.sh sdxl-train", carry=[".whl"], timeout_s=600)
# Each writes PART.json (dreamlora bench --json) and PART.log (the rows as they start, versions, GPU) under $OUT
# (./bench-out where $OUT is unset). BENCH_MODEL=tiny runs a part on the tiny model instead: a check, on CPU, that the
# script itself works before device time is spent (tests/test_bench.py runs it so).
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:-}"
python="${PYTHON:-python3}"

version_of() { sed -n "s/^$1==//p" constraints.txt; }

if [ "$part" = fetch ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # Pure-Python wheels; diffusers' other needs (huggingface_hub, safetensors, Pillow, ...) are on the machine, and
    # importlib_metadata is only read on Python < 3.8.
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl "diffusers==$(version_of diffusers)" "peft==$(version_of peft)"
    ls -l .whl
    exit 0
fi

case "$part" in
    sd15-train) args=(--model "${BENCH_MODEL:-random:sd15}" --part train) ;;
    sd15-prior) args=(--model "${BENCH_MODEL:-random:sd15}" --part prior) ;;
    sdxl-train) args=(--model "${BENCH_MODEL:-random:sdxl}" --part train --no-variants) ;;
    *) echo "usage: $0 fetch | sd15-train | sd15-prior | sdxl-train  (extra arguments go to dreamlora bench)" >&2; exit 2 ;;
esac
shift
out="${OUT:-bench-out}"
mkdir -p "$out"
wheels="${WHEELS:-.whl}"
if compgen -G "$wheels/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dreamlora-site "$wheels"/*.whl
    export PYTHONPATH="/tmp/dreamlora-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$out/$part.log"
{
    date -u
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$python" -c 'import torch, diffusers, transformers, peft; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
    echo "dreamlora bench ${args[*]} $*"
} > "$log" 2>&1
"$python" -m dreamlora bench "${args[@]}" "$@" --json > "$out/$part.json" 2>> "$log"
echo "$part: $out/$part.json" >> "$log"
cat "$log"
