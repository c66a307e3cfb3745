#!/usr/bin/env bash
# Measure GPU judging on this host (benchmarks/gpu/measure.py), after installing the bundle's
# wheels into a private folder on PYTHONPATH: the host's own torch and transformers stay as they are.
#
#   benchmarks/gpu/run.sh [--wheels DIR] [--python PY] [--train-only] [--cpu-smoke] [measure.py options]
#
#   --wheels DIR   wheels from bundle.sh (pip install --no-index --no-deps --target PREFIX)
#   --python PY    the interpreter to use (default python3)
#   --train-only   only the LoRA training step (train_step.py; its options, --out default gpu-train.json)
#   --cpu-smoke    the same path with tiny shapes on the CPU, in under a minute
#   --out FILE     the JSON results (default gpu-measure.json); see measure.py --help for the rest
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
py=python3
wheels=""
script=measure.py
args=()
while (($#)); do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    --python) py=$2; shift 2 ;;
    --train-only) script=train_step.py; shift ;;
    -h|--help) sed -n 2,11p "$0"; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "$wheels" ]; then
  prefix=${CVGL_WHEEL_PREFIX:-$(mktemp -d /tmp/cvgl-wheels-XXXXXX)}
  "$py" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
    --upgrade --target "$prefix" "$wheels"/*.whl
  export PYTHONPATH="$prefix${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$py" -u "$repo/benchmarks/gpu/$script" ${args[@]+"${args[@]}"}
