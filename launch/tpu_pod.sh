#!/usr/bin/env bash
# Train deepseek-jax on a Cloud TPU pod slice: every TPU VM worker of the slice runs the same
# command, and jax.distributed.initialize learns the workers and its own rank from the TPU
# metadata.
#
#     launch/tpu_pod.sh TPU_NAME ZONE CONFIG [key=value ...]
#     launch/tpu_pod.sh my-v5p-64 us-east5-a configs/deepseek-v2-lite.yaml mesh.expert=8
#
# Run it where `gcloud` is logged in. It packs this checkout's committed tree (`git archive
# HEAD`: commit first, uncommitted edits do not travel), copies it to every worker, installs it
# with the TPU build of jax into ~/deepseek-jax-venv there, and starts training on all workers at
# once; a CONFIG path is relative to the repository root. Worker 0 writes the run folder
# (~/runs/RUN_NAME unless train.run_dir is overridden); fetch it with
#     gcloud compute tpus tpu-vm scp --recurse TPU_NAME:runs/RUN_NAME . --zone ZONE --worker=0
#
# Settings read from the environment:
#   PROJECT   gcloud project (default: gcloud's configured one)
#   RUN_NAME  name of the run folder under ~/runs on worker 0 (default: CONFIG's base name)
#   PYTHON    Python 3.11+ on the workers for the venv (default: python3; older TPU VM images
#             ship 3.10: install a newer one or pick a newer image)
#   DRY_RUN=1 print the gcloud commands instead of running them

set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG [key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
CONFIG=$3
shift 3

cd "$(dirname "${BASH_SOURCE[0]}")/.." # the repository root: CONFIG paths are relative to it
JAX_VERSION=0.10.2 # the jax pin in pyproject.toml
RUN_NAME=${RUN_NAME:-$(basename "${CONFIG%.yaml}")}
PYTHON=${PYTHON:-python3}
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE" --worker=all)
if [[ -n ${PROJECT:-} ]]; then
  WHERE+=(--project "$PROJECT")
fi

run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

# The workers' shell parses the remote command from one string: quote every user argument.
# The run folder is outside the unpacked tree, which the next launch replaces.
USER_ARGS=$(printf '%q ' "$@")
REMOTE="set -euo pipefail
rm -rf ~/deepseek-jax && mkdir -p ~/deepseek-jax && tar -xzf ~/deepseek-jax.tar.gz -C ~/deepseek-jax
if [[ ! -d ~/deepseek-jax-venv ]]; then
  $(printf '%q' "$PYTHON") -c 'import sys; assert sys.version_info >= (3, 11), sys.version'
  $(printf '%q' "$PYTHON") -m venv ~/deepseek-jax-venv
fi
source ~/deepseek-jax-venv/bin/activate
pip install --quiet -e ~/deepseek-jax 'jax[tpu]==$JAX_VERSION'
cd ~/deepseek-jax
deepseek-jax train $(printf '%q' "$CONFIG") train.run_dir=\$HOME/runs/$(printf '%q' "$RUN_NAME") \
  ${USER_ARGS}distributed.enabled=true"

ARCHIVE=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$ARCHIVE"' EXIT
git archive --format=tar.gz -o "$ARCHIVE" HEAD
echo "deepseek-jax: commit $(git rev-parse --short HEAD) to every worker of $TPU_NAME ($ZONE)"
run "${GCLOUD[@]}" scp "$ARCHIVE" "$TPU_NAME:deepseek-jax.tar.gz" "${WHERE[@]}"
run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --command "$REMOTE"
