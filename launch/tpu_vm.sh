#!/usr/bin/env bash
# Train dmfnet-jax on a Cloud TPU VM slice (one or many hosts) with its workdir on GCS.
# Run `launch/tpu_vm.sh --help` for the commands; `--dry-run` prints them without running.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND [options] [-- extra --config.* overrides for training]

Commands (each prints what it runs; nothing is run with --dry-run or DRY_RUN=1):
  bucket    create the GCS bucket for workdirs (in the zone's region)
  create    create the TPU VM slice
  setup     copy the project to ALL workers and pip install it with jax[tpu]
  train     run the same training command on ALL workers (workdir gs://...);
            rerunning it resumes from the newest checkpoint in the workdir
  up        create + setup + train
  logs      follow worker 0's log of a --detach run
  stop      SIGTERM the training on all workers (it saves a checkpoint, then stops)
  describe  show the slice
  delete    delete the slice (teardown; the bucket and its checkpoints stay)

Options (flag, else environment variable, else default):
  --project=P       DMFNET_PROJECT, CLOUDSDK_CORE_PROJECT              (required)
  --zone=Z          DMFNET_ZONE, CLOUDSDK_COMPUTE_ZONE                 (required)
  --name=N          DMFNET_TPU_NAME: the TPU VM's name                 (required)
  --accelerator=A   DMFNET_TPU_ACCELERATOR, e.g. v5litepod-16, v4-32   (required by create)
  --runtime=R       DMFNET_TPU_RUNTIME; default by generation: v5litepod -> v2-alpha-tpuv5-lite,
                    v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e, v2/v3/v4 -> tpu-ubuntu2204-base
  --spot            create a Spot slice (cheaper, preemptible: rerun `train` to resume)
  --bucket=B        DMFNET_BUCKET (gs://B or B); the workdir is gs://B/runs/RUN
  --run=RUN         DMFNET_RUN; default: the config's job name (stage1, stage2, ...)
  --workdir=gs://.. DMFNET_WORKDIR: the full workdir instead of --bucket/--run
  --config=C        DMFNET_CONFIG; default configs/stage1.py (presets: configs/stage1.py:tiny)
  --fsdp=N          parameter sharding over N devices (config.mesh.fsdp); default 1
  --data=SRC        DMFNET_DATA: dataset root in the Harvard layout. gs://... is copied
                    (gcloud storage rsync) to ~/dmfnet-data on every worker before training;
                    a plain path must exist on every worker. Empty: built-in phantoms.
  --repo-url=URL    DMFNET_REPO_URL: setup runs `git clone URL` on every worker; without it,
                    setup copies `git archive HEAD` of this checkout (committed files only)
  --ref=REF         DMFNET_REPO_REF: what setup checks out from --repo-url; default origin/HEAD
  --python=PY       DMFNET_PYTHON: the workers' Python; default python3
  --detach          train in the background (nohup; log ~/dmfnet-train.log), so the run
                    survives a lost ssh connection; see `logs` and `stop`
  --dry-run         print the commands, one per line, and run nothing (also DRY_RUN=1)
  -h, --help        this text

jax.distributed is started on every worker (--config.distributed.initialize=on finds the
slice's hosts from the TPU metadata). The global batch (config.train.batch_size) must be
divisible by the slice's chip count: pass e.g. -- --config.train.batch_size=32.

Example:
  launch/tpu_vm.sh up --project=my-proj --zone=us-west4-a --name=dmfnet \
      --accelerator=v5litepod-16 --bucket=my-bucket --data=gs://my-bucket/harvard --detach
  launch/tpu_vm.sh delete --project=my-proj --zone=us-west4-a --name=dmfnet
EOF
}

SCRIPT_NAME=launch/tpu_vm.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=${DRY_RUN:-0}
[[ $DRY_RUN == 1 || $DRY_RUN == 0 ]] || DRY_RUN=1
PROJECT=${DMFNET_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
ZONE=${DMFNET_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
NAME=${DMFNET_TPU_NAME:-}
ACCELERATOR=${DMFNET_TPU_ACCELERATOR:-}
RUNTIME=${DMFNET_TPU_RUNTIME:-}
BUCKET=${DMFNET_BUCKET:-}
RUN_NAME=${DMFNET_RUN:-}
WORKDIR=${DMFNET_WORKDIR:-}
CONFIG=${DMFNET_CONFIG:-configs/stage1.py}
FSDP=1
DATA=${DMFNET_DATA:-}
REPO_URL=${DMFNET_REPO_URL:-}
REPO_REF=${DMFNET_REPO_REF:-origin/HEAD}
PYTHON=${DMFNET_PYTHON:-python3}
SPOT=0
DETACH=0

REMOTE_DIR="~/dmfnet-jax"  # expanded by the workers' shell
REMOTE_DATA="~/dmfnet-data"
REMOTE_LOG="~/dmfnet-train.log"
REMOTE_PID="~/dmfnet-train.pid"

set_switch() {
  case $1 in
    --spot) SPOT=1 ;;
    --detach) DETACH=1 ;;
    *) return 1 ;;
  esac
}

set_option() {  # set_option KEY VALUE
  case $1 in
    --project) PROJECT=$2 ;;
    --zone) ZONE=$2 ;;
    --name) NAME=$2 ;;
    --accelerator|--accelerator-type) ACCELERATOR=$2 ;;
    --runtime|--version) RUNTIME=$2 ;;
    --bucket) BUCKET=$2 ;;
    --run) RUN_NAME=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --config) CONFIG=$2 ;;
    --fsdp) FSDP=$2 ;;
    --data) DATA=$2 ;;
    --repo-url) REPO_URL=$2 ;;
    --ref) REPO_REF=$2 ;;
    --python) PYTHON=$2 ;;
    *) die "unknown option '$1'" ;;
  esac
}

parse_arguments "$@"

[[ -n $COMMAND ]] || { usage >&2; exit 2; }

require() {  # require VALUE FLAG ENV_VAR
  [[ -n $1 ]] || die "$COMMAND needs $2 (or the environment variable $3)"
}

require_target() {
  require "$PROJECT" --project DMFNET_PROJECT
  require "$ZONE" --zone DMFNET_ZONE
  require "$NAME" --name DMFNET_TPU_NAME
}

default_runtime() {
  case $1 in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

gcloud_tpu() {  # gcloud_tpu VERB [args...]
  local verb=$1
  shift
  run gcloud compute tpus tpu-vm "$verb" "$NAME" --project="$PROJECT" --zone="$ZONE" "$@"
}

on_all_workers() {
  gcloud_tpu ssh --worker=all --command="$1"
}

cmd_bucket() {
  require "$PROJECT" --project DMFNET_PROJECT
  require "$ZONE" --zone DMFNET_ZONE
  require "$BUCKET" --bucket DMFNET_BUCKET
  run gcloud storage buckets create "gs://${BUCKET#gs://}" --project="$PROJECT" \
    --location="${ZONE%-*}" --uniform-bucket-level-access
}

check_create() {
  require_target
  require "$ACCELERATOR" --accelerator DMFNET_TPU_ACCELERATOR
  if [[ -z $RUNTIME ]]; then
    RUNTIME=$(default_runtime "$ACCELERATOR") ||
      die "no default runtime for accelerator '$ACCELERATOR': pass --runtime (see gcloud compute tpus tpu-vm versions list)"
  fi
}

cmd_create() {
  local extra=()
  ((SPOT)) && extra+=(--spot)
  gcloud_tpu create --accelerator-type="$ACCELERATOR" --version="$RUNTIME" \
    --scopes=https://www.googleapis.com/auth/cloud-platform ${extra[@]+"${extra[@]}"}
}

cmd_setup() {
  local fetch install
  # gcsfs: Orbax (through etils.epath) needs it for gs:// directories without TensorFlow.
  install="cd $REMOTE_DIR && $(quote_all "$PYTHON" -m pip install -q -e .)"
  install+=" && $(quote_all "$PYTHON" -m pip install -q 'jax[tpu]' gcsfs)"
  if [[ -n $REPO_URL ]]; then
    fetch="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch --quiet --tags origin;"
    fetch+=" else git clone --quiet $(quote "$REPO_URL") $REMOTE_DIR; fi"
    fetch+=" && git -C $REMOTE_DIR checkout --quiet --force $(quote "$REPO_REF")"
    on_all_workers "set -e; $fetch && $install"
  else
    local archive="${TMPDIR:-/tmp}/dmfnet-jax-$NAME.tar.gz"
    run git -C "$REPO_ROOT" archive --format=tar.gz --prefix=dmfnet-jax/ -o "$archive" HEAD
    run gcloud compute tpus tpu-vm scp "$archive" "$NAME:dmfnet-jax.tar.gz" --worker=all \
      --project="$PROJECT" --zone="$ZONE"
    on_all_workers "set -e; rm -rf $REMOTE_DIR && tar -xzf ~/dmfnet-jax.tar.gz -C ~ && $install"
  fi
}

default_workdir() {
  local job=${CONFIG##*/}
  job=${job%%:*}
  job=${job%.py}
  echo "gs://${BUCKET#gs://}/runs/${RUN_NAME:-$job}"
}

check_train() {
  require_target
  if [[ -z $WORKDIR ]]; then
    [[ -n $BUCKET ]] || die "$COMMAND needs --bucket (or DMFNET_BUCKET) or --workdir=gs://... (or DMFNET_WORKDIR)"
    WORKDIR=$(default_workdir)
  fi
  [[ $WORKDIR == gs://?* ]] ||
    die "--workdir=$WORKDIR: must be a gs:// path, so that every worker reads and writes the same checkpoints"
  [[ $FSDP =~ ^[1-9][0-9]*$ ]] || die "--fsdp=$FSDP: must be a positive integer"
}

cmd_train() {
  local sync="" data_flag=""
  if [[ $DATA == gs://* ]]; then
    sync="mkdir -p $REMOTE_DATA && gcloud storage rsync --recursive $(quote "$DATA") $REMOTE_DATA && "
    data_flag=' --config.data.root=$HOME/dmfnet-data'
  elif [[ -n $DATA ]]; then
    data_flag=" $(quote "--config.data.root=$DATA")"
  fi
  local train
  train=$(quote_all "$PYTHON" -m dmfnet_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" \
    --config.distributed.initialize=on --config.mesh.data=-1 "--config.mesh.fsdp=$FSDP")
  train+=$data_flag
  ((${#EXTRA[@]})) && train+=" $(quote_all "${EXTRA[@]}")"
  if ((DETACH)); then
    on_all_workers "cd $REMOTE_DIR && ${sync}{ nohup $train > $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID; }"
  else
    on_all_workers "cd $REMOTE_DIR && ${sync}$train"
  fi
}

cmd_logs() {
  require_target
  gcloud_tpu ssh --worker=0 --command="tail -n 200 -F $REMOTE_LOG"
}

cmd_stop() {
  require_target
  on_all_workers "if [ -f $REMOTE_PID ]; then kill -TERM \"\$(cat $REMOTE_PID)\" || true; fi"
}

# Every setting is checked before the first command runs.
case $COMMAND in
  bucket) cmd_bucket ;;
  create) check_create; cmd_create ;;
  setup) require_target; cmd_setup ;;
  train) check_train; cmd_train ;;
  up) check_create; check_train; cmd_create; cmd_setup; cmd_train ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  describe) require_target; gcloud_tpu describe ;;
  delete) require_target; gcloud_tpu delete --quiet ;;
  *) die "unknown command '$COMMAND' (bucket, create, setup, train, up, logs, stop, describe, delete)" ;;
esac
