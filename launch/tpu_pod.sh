#!/usr/bin/env bash
# Runs jaxdpo on a Cloud TPU VM slice: one trainer process per TPU host (`--worker=all`).
#
#   TPU_NAME=dpo-v5e ZONE=us-west4-a ACCELERATOR_TYPE=v5litepod-16 CREATE=1 SPOT=1 \
#   WORKDIR=gs://my-bucket/runs/qwen-dpo CONFIG=configs/qwen2_5_vl_3b_dpo.py:/ckpt/qwen2_5_vl_3b \
#   launch/tpu_pod.sh --config.data.train=gs://my-bucket/data/prefs.jsonl
#
# Arguments are passed to `python -m jaxdpo.main`. WORKDIR must be visible to every host (a GCS
# bucket): all hosts write their checkpoint shards there. A preempted run is restarted by running
# the same command again, which resumes from the latest checkpoint in WORKDIR. DRY_RUN=1 prints
# the commands instead of running them. See launch/README.md.
set -euo pipefail

TPU_NAME=${TPU_NAME:?set TPU_NAME to the TPU VM name}
ZONE=${ZONE:?set ZONE, e.g. us-west4-a}
WORKDIR=${WORKDIR:?set WORKDIR to a bucket every host can write, e.g. gs://bucket/runs/name}
CONFIG=${CONFIG:-configs/qwen2_5_vl_3b_dpo.py}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
CREATE=${CREATE:-0}                 # 1: create the slice first (and re-create it after a preemption)
SPOT=${SPOT:-0}                     # 1: a Spot slice (cheaper, preemptible)
SRC=${SRC:-$(cd "$(dirname "$0")/.." && pwd)}  # this checkout, copied to every host
REMOTE_DIR=${REMOTE_DIR:-jaxdpo}
JAX_PIP=${JAX_PIP:-jax[tpu]}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-20}
DRY_RUN=${DRY_RUN:-0}

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

project_flag=()
if [[ -n "$PROJECT" ]]; then
  project_flag=(--project "$PROJECT")
fi
spot_flag=()
if [[ "$SPOT" == 1 ]]; then
  spot_flag=(--spot)
fi
tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE" "${project_flag[@]}")

create() {
  run "${tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type "$ACCELERATOR_TYPE" \
    --version "$RUNTIME_VERSION" "${spot_flag[@]}"
}

install() {
  run "${tpu[@]}" scp --recurse "$SRC" "$TPU_NAME:$REMOTE_DIR" "${where[@]}" --worker=all
  run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all \
    --command "pip install -U '$JAX_PIP' && pip install -e ~/$REMOTE_DIR"
}

state() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo READY
  else
    "${tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format 'value(state)' || echo MISSING
  fi
}

# The trainer command, quoted once for the remote shell. --distributed=on: every host joins the
# JAX runtime, which reads the slice layout from the TPU metadata server.
train_cmd="cd ~/$REMOTE_DIR && python -m jaxdpo.main --distributed=on"
train_cmd+=" --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR")"
for arg in "$@"; do
  train_cmd+=" $(printf '%q' "$arg")"
done

if [[ "$CREATE" == 1 ]]; then
  create
fi
install
for attempt in $(seq 1 "$MAX_ATTEMPTS"); do
  echo "jaxdpo: attempt $attempt of $MAX_ATTEMPTS on $TPU_NAME" >&2
  rc=0
  run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$train_cmd" || rc=$?
  vm_state=$(state)
  if [[ "$rc" == 0 && "$vm_state" == READY ]]; then
    exit 0
  fi
  # Preempted (the slice is gone or stopped) or the run died: bring the slice back and resume.
  echo "jaxdpo: run ended with exit code $rc, slice state $vm_state; restarting" >&2
  if [[ "$vm_state" != READY && "$CREATE" == 1 ]]; then
    run "${tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet || true
    create
    install
  elif [[ "$vm_state" != READY ]]; then
    echo "jaxdpo: slice $TPU_NAME is $vm_state and CREATE=0: not re-creating it" >&2
    exit 1
  fi
done
echo "jaxdpo: gave up after $MAX_ATTEMPTS attempts" >&2
exit 1
