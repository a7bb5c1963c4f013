#!/usr/bin/env bash
# Builds the pedconv image from the repository's Dockerfile (FROM the pinned NGC PyTorch release).
#   docker/build.sh [TAG] [docker build options...]
# TAG defaults to $PEDCONV_IMAGE, else pedconv:latest. Run it from anywhere; the build context is the repository.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
image="${1:-${PEDCONV_IMAGE:-pedconv:latest}}"
shift || true

if ! command -v docker >/dev/null 2>&1; then
    echo "build.sh: docker not found; install Docker and the NVIDIA Container Toolkit first" >&2
    exit 1
fi

docker build --pull --tag "$image" --file "$root/Dockerfile" "$@" "$root"
echo "built $image"
