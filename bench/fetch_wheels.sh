#!/usr/bin/env bash
# Downloads, into .whl/ at the repo root, the wheels bench/run_h200.sh needs on a machine whose image
# has CUDA JAX, torch, transformers, peft, pyarrow and pandas but no network (Python 3.12, x86-64).
# Run it where pip can reach a package index; .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d .whl ml-collections grain array-record dm-tree trl datasets dill multiprocess liger-kernel jiwer rapidfuzz
ls -la .whl; du -sh .whl
