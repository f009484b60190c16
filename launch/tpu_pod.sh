#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM slice, as one multi-host JAX run: creates the TPU VM unless it
# exists, puts this code on every worker, installs it, and starts the same command everywhere at once. Each worker's
# JAX finds the others through the TPU metadata (lm.distributed), so the command is the one you would run locally.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE [--accelerator_type=TYPE] [options] -- COMMAND [ARG...]

Runs COMMAND on every worker of the TPU VM NAME, all at once:
  1. creates NAME unless it exists:
       gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME
  2. copies this checkout (files git tracks or does not ignore) to ~/lm on every worker
     (gcloud compute tpus tpu-vm scp --worker=all), or fetches --repo at --ref there;
  3. installs it on every worker: ~/lm/.venv (Python 3.11+) with pip install -e '.[tpu]';
  4. runs COMMAND in ~/lm with that environment on every worker
     (gcloud compute tpus tpu-vm ssh --worker=all --command=...).
The workers share nothing but the bucket: --workdir must be a gs:// path (checkpoints, metrics, config).

Options:
  --name=NAME              TPU VM name (required)
  --zone=ZONE              zone, e.g. us-east5-a (required)
  --accelerator_type=TYPE  v4-32, v5litepod-16, v5p-64, v6e-16, ...; needed only to create the TPU VM
  --version=RUNTIME        TPU software version; default by type: v4 tpu-ubuntu2204-base,
                           v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --project=PROJECT        Google Cloud project (default: gcloud's configured project)
  --spot                   create a Spot TPU VM (cheaper; can be preempted, then resume from the bucket)
  --repo=URL               fetch this git repository on the workers instead of copying this checkout
  --ref=REF                branch, tag or commit of --repo (default main)
  --python=PYTHON          interpreter for the environment (default python3.11; apt-get installs it if missing)
  --skip_setup             only run COMMAND: the code and environment are already on the workers
  --detach                 start COMMAND under nohup and return; its output goes to ~/lm/run.log on each worker
  -h, --help               show this help

Example (Llama-3-8B shapes on a v5p-64: 32 chips on 8 workers, every chip on fsdp):
  launch/tpu_pod.sh --name=lm-v5p --zone=us-east5-a --accelerator_type=v5p-64 -- \
      python -m lm.train --config=configs/llama_8b.py --workdir=gs://MY_BUCKET/runs/llama8b
Check the plan first, on any machine:
  python -m lm.preflight --config=configs/llama_8b.py --mesh=fsdp=32 --device=v5p
Delete the TPU VM when done (it is billed while it exists):
  gcloud compute tpus tpu-vm delete lm-v5p --zone=us-east5-a
EOF
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

name="" zone="" accelerator_type="" version="" project="" repo="" ref="main" python="python3.11"
spot=false skip_setup=false detach=false
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator_type=*) accelerator_type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --ref=*) ref="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --spot) spot=true ;;
    --skip_setup) skip_setup=true ;;
    --detach) detach=true ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
  shift
done
[[ -n "$name" ]] || die "--name=NAME is required (see --help)"
[[ -n "$zone" ]] || die "--zone=ZONE is required (see --help)"
(($#)) || die "no command given (see --help)"
previous=""
for arg in "$@"; do
  workdir=""
  [[ "$previous" == "--workdir" ]] && workdir="$arg"
  [[ "$arg" == --workdir=* ]] && workdir="${arg#--workdir=}"
  if [[ -n "$workdir" && "$workdir" != gs://* ]]; then
    die "--workdir=$workdir: the workers share no disk, use a bucket (--workdir=gs://BUCKET/PATH)"
  fi
  previous="$arg"
done
command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)"

where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

on_every_worker() {
  gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"
}

default_version() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default --version for --accelerator_type=$1: give --version=RUNTIME" ;;
  esac
}

state="$(gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null || true)"
if [[ -z "$state" ]]; then
  [[ -n "$accelerator_type" ]] || die "TPU VM $name does not exist in $zone: give --accelerator_type to create it"
  [[ -n "$version" ]] || version="$(default_version "$accelerator_type")"
  create=(--accelerator-type="$accelerator_type" --version="$version")
  "$spot" && create+=(--spot)
  echo "tpu_pod.sh: creating TPU VM $name ($accelerator_type, $version) in $zone" >&2
  gcloud compute tpus tpu-vm create "$name" "${where[@]}" "${create[@]}"
elif [[ "$state" != READY ]]; then
  die "TPU VM $name is $state, not READY: wait, or delete it (gcloud compute tpus tpu-vm delete $name --zone=$zone)"
fi

if ! "$skip_setup"; then
  if [[ -n "$repo" ]]; then
    # init + fetch works for a fresh or an existing ~/lm and for any branch, tag or commit.
    on_every_worker "set -e; git init -q ~/lm; git -C ~/lm fetch -q --depth=1 $(printf %q "$repo") $(printf %q "$ref");
      git -C ~/lm checkout -q --force FETCH_HEAD"
  else
    root="$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null)" ||
      die "$(dirname "$0") is not in a git checkout: give --repo=URL"
    archive="$(mktemp -d)/lm.tar.gz"
    # Files git tracks or does not ignore (no virtual environments, workdirs or caches), that exist.
    (cd "$root" && git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' file; do [[ -e "$file" ]] && printf '%s\0' "$file"; done |
      tar --null -T - -czf "$archive")
    gcloud compute tpus tpu-vm scp "$archive" "$name":lm.tar.gz "${where[@]}" --worker=all
    on_every_worker "set -e; mkdir -p ~/lm; tar -xzf ~/lm.tar.gz -C ~/lm; rm ~/lm.tar.gz"
    rm -r "$(dirname "$archive")"
  fi
  # A fresh TPU VM may still be running unattended upgrades: wait for the dpkg lock instead of failing.
  on_every_worker "set -e; cd ~/lm
    if ! command -v $(printf %q "$python") >/dev/null; then
      sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
      sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq $(printf %q "$python") $(printf %q "$python")-venv
    fi
    [ -x .venv/bin/python ] || $(printf %q "$python") -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[tpu]'"
fi

command_line="$(printf '%q ' "$@")"
if "$detach"; then
  on_every_worker "cd ~/lm && nohup bash -c $(printf %q ". .venv/bin/activate && exec $command_line") \
    > ~/lm/run.log 2>&1 < /dev/null &"
  echo "tpu_pod.sh: started on every worker of $name; output in ~/lm/run.log there" >&2
else
  on_every_worker "cd ~/lm && . .venv/bin/activate && $command_line"
fi
