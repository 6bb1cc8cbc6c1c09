#!/usr/bin/env bash
# Wheels for a GPU machine whose Python (3.12 on the lent H200s) has torch but lacks some
# of our dependencies (torchao: train.float8): written to .whl/, which bench/gpu_smoke.sh and
# bench/gpu_speed.sh install from when present.
#   bash bench/gpu_wheels.sh            # then carry .whl with the working tree
#   PYVER=3.11 bash bench/gpu_wheels.sh # for a machine whose python3 is 3.11
# Versions are this checkout's venv's, so both machines run the same code. antlr4 (a
# dependency of omegaconf) ships as a source archive only: built here as a pure-Python wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
mkdir -p .whl
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"
ver() { $PIP show "$1" 2>/dev/null | awk '/^Version:/ {print $2}'; }
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform any)
for pkg in hydra-core omegaconf torchdata quicktok-v1 zstandard torchao; do
  v=$(ver "$pkg"); [ -n "$v" ] || { echo "$pkg is not installed in this venv"; exit 1; }
  $PIP download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp "${PLAT[@]}" \
    -d .whl "$pkg==$v"
done
$PIP wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(ver antlr4-python3-runtime)"
ls -la .whl
