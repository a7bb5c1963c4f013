#!/usr/bin/env bash
# Evaluates a checkpoint on the ImageNet validation set (one process, batch 100), as in the authors' README.
# Run inside the container:
#   bash docker/evaluate.sh CHECKPOINT [--data DIR] [--workspace DIR] [-- MAIN_ARGS...]
#   CHECKPOINT   a checkpoint of ours or the authors' released weights (.pth.tar); it says whether the model is
#                PEDConv and how wide, so neither --dynamic nor --wmul is needed
#   --data DIR   default /data/imagenet;  --workspace DIR  default /workspace/results/evaluate (report: raport.json)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage="usage: evaluate.sh CHECKPOINT [--data DIR] [--workspace DIR] [-- MAIN_ARGS...]"
data=/data/imagenet
workspace=/workspace/results/evaluate
checkpoint=""
extra=()

while [ "$#" -gt 0 ]; do
    case "$1" in
        --data) data="${2:?--data needs a folder}"; shift 2 ;;
        --workspace) workspace="${2:?--workspace needs a folder}"; shift 2 ;;
        --) shift; extra+=("$@"); break ;;
        -h|--help) echo "$usage"; exit 0 ;;
        -*) echo "evaluate.sh: unknown option $1; $usage" >&2; exit 2 ;;
        *)
            if [ -n "$checkpoint" ]; then echo "evaluate.sh: one checkpoint at a time; $usage" >&2; exit 2; fi
            checkpoint="$1"; shift ;;
    esac
done
if [ -z "$checkpoint" ]; then
    echo "evaluate.sh: no checkpoint given; $usage" >&2
    exit 2
fi
if [ ! -f "$checkpoint" ]; then
    echo "evaluate.sh: checkpoint not found: $checkpoint" >&2
    exit 2
fi
checkpoint="$(cd "$(dirname "$checkpoint")" && pwd)/$(basename "$checkpoint")"

cd "$root"
set -x
python ./main.py "$data" --data-backend pytorch --arch resnet18 \
    --evaluate --epochs 1 --pretrained-weights "$checkpoint" -b 100 \
    --workspace "$workspace" --raport-file raport.json "${extra[@]}"
