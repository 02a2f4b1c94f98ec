#!/usr/bin/env bash
# Train dmfnet-jax on one host with all its GPUs, or on several hosts through SLURM.
# Run `launch/gpu_host.sh --help` for the commands; `--dry-run` prints them without running.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_host.sh [COMMAND] [options] [-- extra --config.* overrides]

Commands (each prints what it runs; nothing is run with --dry-run or DRY_RUN=1):
  install   pip install the project and jax[cuda12] (NVIDIA driver >= 525 needed;
            jax's CUDA wheels bring CUDA and cuDNN), then list the devices JAX sees
  devices   list the devices JAX sees
  train     (default) one process on this host, the mesh over all its GPUs
            (or those of --gpus); rerunning the same command resumes
  slurm     submit launch/slurm_gpu.sbatch: one process per host, each with all
            of its host's GPUs, one mesh over every GPU of the job

Options (flag, else environment variable, else default):
  --config=C          DMFNET_CONFIG; default configs/stage1.py (presets: configs/stage1.py:tiny)
  --workdir=DIR       DMFNET_WORKDIR; train: default runs/<job>. slurm: required, on a
                      filesystem every node sees (or gs://...)
  --gpus=0,1,...      train: the GPUs to use (CUDA_VISIBLE_DEVICES); default all
  --fsdp=N            parameter sharding over N devices (config.mesh.fsdp); default 1,
                      the rest of the devices form config.mesh.data
  --python=PY         PYTHON; default python
  --nodes=N           slurm: hosts; DMFNET_SLURM_NODES, default 2
  --gpus-per-node=G   slurm: DMFNET_SLURM_GPUS_PER_NODE, default 8
  --partition=P       slurm: DMFNET_SLURM_PARTITION (site default if empty)
  --account=A         slurm: DMFNET_SLURM_ACCOUNT (site default if empty)
  --time=HH:MM:SS     slurm: DMFNET_SLURM_TIME (site default if empty)
  --dry-run           print the commands, one per line, and run nothing (also DRY_RUN=1)
  -h, --help          this text

The global batch (config.train.batch_size) is split over every GPU, so it must be
divisible by their number: pass e.g. -- --config.train.batch_size=16.

Examples:
  launch/gpu_host.sh install
  launch/gpu_host.sh train --workdir=runs/stage1 -- --config.train.batch_size=16
  launch/gpu_host.sh slurm --nodes=4 --gpus-per-node=8 --partition=gpu \
      --workdir=/shared/runs/stage1 -- --config.train.batch_size=64
EOF
}

SCRIPT_NAME=launch/gpu_host.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=${DRY_RUN:-0}
[[ $DRY_RUN == 1 || $DRY_RUN == 0 ]] || DRY_RUN=1
CONFIG=${DMFNET_CONFIG:-configs/stage1.py}
WORKDIR=${DMFNET_WORKDIR:-}
GPUS=""
FSDP=1
PYTHON=${PYTHON:-python}
NODES=${DMFNET_SLURM_NODES:-2}
GPUS_PER_NODE=${DMFNET_SLURM_GPUS_PER_NODE:-8}
PARTITION=${DMFNET_SLURM_PARTITION:-}
ACCOUNT=${DMFNET_SLURM_ACCOUNT:-}
TIME_LIMIT=${DMFNET_SLURM_TIME:-}

set_option() {  # set_option KEY VALUE
  case $1 in
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --gpus) GPUS=$2 ;;
    --fsdp) FSDP=$2 ;;
    --python) PYTHON=$2 ;;
    --nodes) NODES=$2 ;;
    --gpus-per-node) GPUS_PER_NODE=$2 ;;
    --partition) PARTITION=$2 ;;
    --account) ACCOUNT=$2 ;;
    --time) TIME_LIMIT=$2 ;;
    *) die "unknown option '$1'" ;;
  esac
}

parse_arguments "$@"
COMMAND=${COMMAND:-train}

positive() {  # positive VALUE FLAG
  [[ $1 =~ ^[1-9][0-9]*$ ]] || die "$2=$1: must be a positive integer"
}

job_name() {
  local job=${CONFIG##*/}
  job=${job%%:*}
  echo "${job%.py}"
}

devices_command() {
  run "$PYTHON" -c 'import jax; print(jax.device_count(), "devices:", jax.devices())'
}

cmd_install() {
  run cd "$REPO_ROOT"
  run "$PYTHON" -m pip install -e .
  run "$PYTHON" -m pip install 'jax[cuda12]'
  devices_command
}

cmd_train() {
  positive "$FSDP" --fsdp
  [[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] ||
    die "--gpus=$GPUS: use a comma-separated list of GPU indices, e.g. --gpus=0,1,2,3"
  WORKDIR=${WORKDIR:-runs/$(job_name)}
  local env_prefix=()
  [[ -n $GPUS ]] && env_prefix=(env "CUDA_VISIBLE_DEVICES=$GPUS")
  if [[ $DRY_RUN != 1 ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "launch/gpu_host.sh: warning: nvidia-smi not found; JAX may fall back to the CPU" >&2
  fi
  run cd "$REPO_ROOT"
  # One process (initialize=off, even inside a SLURM allocation) sees every local GPU.
  run ${env_prefix[@]+"${env_prefix[@]}"} "$PYTHON" -m dmfnet_jax.main "--config=$CONFIG" \
    "--workdir=$WORKDIR" --config.distributed.initialize=off --config.mesh.data=-1 \
    "--config.mesh.fsdp=$FSDP" ${EXTRA[@]+"${EXTRA[@]}"}
}

cmd_slurm() {
  [[ -n $WORKDIR ]] ||
    die "slurm needs --workdir (or DMFNET_WORKDIR): a folder every node sees, e.g. --workdir=/shared/runs/$(job_name)"
  positive "$FSDP" --fsdp
  positive "$NODES" --nodes
  positive "$GPUS_PER_NODE" --gpus-per-node
  local options=(--chdir="$REPO_ROOT" --nodes="$NODES" --ntasks-per-node=1
                 --gpus-per-node="$GPUS_PER_NODE")
  [[ -n $PARTITION ]] && options+=(--partition="$PARTITION")
  [[ -n $ACCOUNT ]] && options+=(--account="$ACCOUNT")
  [[ -n $TIME_LIMIT ]] && options+=(--time="$TIME_LIMIT")
  run sbatch "${options[@]}" "$REPO_ROOT/launch/slurm_gpu.sbatch" "--config=$CONFIG" "--workdir=$WORKDIR" \
    "--fsdp=$FSDP" -- ${EXTRA[@]+"${EXTRA[@]}"}
}

case $COMMAND in
  install) cmd_install ;;
  devices) devices_command ;;
  train) cmd_train ;;
  slurm) cmd_slurm ;;
  *) die "unknown command '$COMMAND' (install, devices, train, slurm)" ;;
esac
