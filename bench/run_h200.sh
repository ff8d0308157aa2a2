#!/usr/bin/env bash
# jaxdpo's bench and the TRL peer on one machine, in one go: one JSON line per run, then a ratio table.
#
#   bash bench/run_h200.sh                    # one NVIDIA H200: uniform-1k, ocr-2k, uniform-1k-gemma
#   bash bench/run_h200.sh --workloads tiny   # any CPU, in a minute (needs torch, trl, datasets)
#
# With no network (the H200 machine), carry the packages the machine lacks as wheels in .whl/ at the
# repo root (README, "Benchmark"): ml-collections, grain and its needs, trl, datasets and its needs,
# peft, liger-kernel. They are installed to /tmp/site first. PEER is the peer script's path
# (default ../shared/bench/trl_dpo_peer.py, else shared/bench/trl_dpo_peer.py); RESULTS, if set, is a
# file that gets a copy of the output. Extra arguments go to `python -m jaxdpo.bench --suite`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PEER="${PEER:-}"
for p in ../shared/bench/trl_dpo_peer.py shared/bench/trl_dpo_peer.py; do
  [ -z "$PEER" ] && [ -f "$p" ] && PEER="$p"
done
[ -n "$PEER" ] || { echo "run_h200.sh: no peer script; set PEER=path/to/trl_dpo_peer.py" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi (CPU run)"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
python3 -m jaxdpo.bench --suite --run-peer "$PEER" --steps "${STEPS:-8}" --run-timeout "${RUN_TIMEOUT:-170}" "$@" \
  | tee "${RESULTS:-/dev/null}"
