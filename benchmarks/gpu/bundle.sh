#!/usr/bin/env bash
# Download the wheels an air-gapped GPU host lacks (wheels.txt), for its Python, on a machine
# where the package index is reachable; copy DIR to the host and give it to run.sh --wheels.
#
#   benchmarks/gpu/bundle.sh DIR [--python-version 3.12]
#
# Exactly the pinned files, no dependency resolution (--no-deps): the host installs them with
# --no-index --no-deps, so nothing it has (torch, transformers) is replaced.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=""
pyver=3.12
while (($#)); do
  case "$1" in
    --python-version) pyver=$2; shift 2 ;;
    -h|--help) sed -n 2,9p "$0"; exit 0 ;;
    *) dir=$1; shift ;;
  esac
done
[ -n "$dir" ] || { echo "usage: $0 DIR [--python-version 3.12]" >&2; exit 2; }
mkdir -p "$dir"
pip=${PIP:-python3 -m pip}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
$pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$pyver" --implementation cp "${platforms[@]}" -d "$dir" -r "$here/wheels.txt"

# One file per pinned package, and the whole bundle under 60 MiB.
wanted=$(grep -cvE '^\s*(#|$)' "$here/wheels.txt")
have=$(find "$dir" -maxdepth 1 -type f -name '*.whl' | wc -l)
if [ "$have" -ne "$wanted" ]; then
  echo "bundle: $have wheels in $dir for $wanted pinned packages (one version of each expected)" >&2
  exit 1
fi
bytes=$(du -cb "$dir"/*.whl | tail -1 | cut -f1)
if [ "$bytes" -gt $((60 * 1024 * 1024)) ]; then
  echo "bundle: $((bytes / 1048576)) MiB, more than 60 MiB" >&2
  exit 1
fi
echo "bundle: $have wheels, $((bytes / 1048576)) MiB, for CPython $pyver manylinux x86_64, in $dir"
