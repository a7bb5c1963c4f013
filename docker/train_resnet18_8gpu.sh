#!/usr/bin/env bash
# The authors' recipe: dynamic (PEDConv) ResNet-18, 250 epochs, 8 GPUs x 64 images (optimizer batch 512),
# cosine schedule with 8 warmup epochs, label smoothing 0.1, mixup 0.2, PyTorch data loading.
# Run inside the container (docker/interactive.sh), from anywhere:
#   bash docker/train_resnet18_8gpu.sh [--amp] [--nhwc] [--nproc N] [--data DIR] [--workspace DIR] [-- MAIN_ARGS...]
#   --amp        mixed precision with a static loss scale of 128 (NVIDIA's A100/V100 setting)
#   --nhwc       channels-last memory format (use with --amp on Tensor Core GPUs)
#   --nproc N    processes (GPUs) on this node, default 8; the optimizer batch stays 512 (gradient accumulation)
#   --data DIR   default /data/imagenet;  --workspace DIR  default /workspace/results/resnet18_dynamic
# Arguments after -- go to main.py as they are (e.g. -- --resume /workspace/results/resnet18_dynamic/checkpoint.pth.tar).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data=/data/imagenet
workspace=/workspace/results/resnet18_dynamic
nproc=8
extra=()

while [ "$#" -gt 0 ]; do
    case "$1" in
        --amp) extra+=(--amp --static-loss-scale 128); shift ;;
        --nhwc) extra+=(--memory-format nhwc); shift ;;
        --nproc) nproc="${2:?--nproc needs a number}"; shift 2 ;;
        --data) data="${2:?--data needs a folder}"; shift 2 ;;
        --workspace) workspace="${2:?--workspace needs a folder}"; shift 2 ;;
        --) shift; extra+=("$@"); break ;;
        *) echo "train_resnet18_8gpu.sh: unknown option $1 (main.py arguments go after --)" >&2; exit 2 ;;
    esac
done

cd "$root"
set -x
python ./multiproc.py --nproc_per_node "$nproc" ./main.py "$data" \
    --data-backend pytorch --raport-file raport.json -j8 -p 100 \
    --lr 0.512 --optimizer-batch-size 512 --warmup 8 \
    --arch resnet18 --dynamic -c fanin \
    --label-smoothing 0.1 --lr-schedule cosine --mom 0.875 --wd 3.0517578125e-05 \
    -b 64 --epochs 250 --mixup 0.2 \
    --workspace "$workspace" "${extra[@]}"
