#!/usr/bin/env bash
# Starts the pedconv image with every GPU, the data set at /data/imagenet (read-only) and a host folder for
# reports, checkpoints and per-rank logs at /workspace/results.
#   docker/interactive.sh [DATA_DIR [WORKSPACE_DIR]] [-- COMMAND...]
# DATA_DIR defaults to $PEDCONV_DATA, WORKSPACE_DIR to $PEDCONV_WORKSPACE, else ./logs (created).
# The image is $PEDCONV_IMAGE, else pedconv:latest. Without a COMMAND it opens a shell in /workspace/pedconv.
# Extra `docker run` options: $PEDCONV_DOCKER_ARGS (split on spaces), e.g. "--network=host" for several nodes.
# Example: docker/interactive.sh /raid/imagenet /raid/runs -- bash docker/train_resnet18_8gpu.sh --amp
set -euo pipefail

usage="usage: docker/interactive.sh [DATA_DIR [WORKSPACE_DIR]] [-- COMMAND...]"
data="${PEDCONV_DATA:-}"
workspace="${PEDCONV_WORKSPACE:-./logs}"
image="${PEDCONV_IMAGE:-pedconv:latest}"

positional=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --) shift; break ;;
        -h|--help) echo "$usage"; exit 0 ;;
        -*) echo "interactive.sh: unknown option $1; $usage" >&2; exit 2 ;;
        *) positional+=("$1"); shift ;;
    esac
done
if [ "${#positional[@]}" -gt 2 ]; then
    echo "interactive.sh: too many arguments (put the command after --); $usage" >&2
    exit 2
fi
if [ "${#positional[@]}" -ge 1 ]; then data="${positional[0]}"; fi
if [ "${#positional[@]}" -ge 2 ]; then workspace="${positional[1]}"; fi

if [ -z "$data" ]; then
    echo "interactive.sh: no data set given (DATA_DIR argument or PEDCONV_DATA); $usage" >&2
    exit 2
fi
if [ ! -d "$data/train" ] || [ ! -d "$data/val" ]; then
    echo "interactive.sh: $data must hold train/ and val/ (see docs/imagenet.md)" >&2
    exit 2
fi
mkdir -p "$workspace"
data="$(cd "$data" && pwd)"
workspace="$(cd "$workspace" && pwd)"

docker_args=()
read -r -a docker_args <<<"${PEDCONV_DOCKER_ARGS:-}"

tty=(--interactive)
if [ -t 0 ] && [ -t 1 ]; then tty+=(--tty); fi

# --ipc=host: DataLoader workers and NCCL share memory through /dev/shm, which Docker caps at 64 MB otherwise.
# The data-scan and demo caches live in the workspace, so that they outlive the --rm container.
exec docker run --rm "${tty[@]}" --gpus all --ipc=host \
    --ulimit memlock=-1 --ulimit stack=67108864 \
    --volume "$data:/data/imagenet:ro" \
    --volume "$workspace:/workspace/results" \
    --env PEDCONV_DATA_CACHE=/workspace/results/.cache/data-scans \
    --env XDG_CACHE_HOME=/workspace/results/.cache \
    "${docker_args[@]}" "$image" "$@"
