#!/usr/bin/env bash
# Build (and with --push, push) the trainer/pipeline image with docker buildx.
# The tag is pyproject.toml's version: REGISTRY/pirl:VERSION (GPU) or REGISTRY/pirl:VERSION-cpu.
#
#   images/build.sh [--cpu] [--push] [--platform linux/amd64]
#   REGISTRY=ghcr.io/acme images/build.sh --push
#
# Without --push the image is loaded into the local Docker engine (--load).
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."

REGISTRY="${REGISTRY:-registry.example.com/ml}"
PLATFORM="linux/amd64"
VARIANT="gpu"
OUTPUT="--load"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) VARIANT="cpu" ;;
    --push) OUTPUT="--push" ;;
    --platform) PLATFORM="$2"; shift ;;
    -h|--help) sed -n '2,8p' "$SELF"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

VERSION="$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n 1)"
if [ -z "$VERSION" ]; then
  echo "build.sh: no version = \"...\" line in pyproject.toml" >&2
  exit 2
fi
VCS_REF="$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)"
SOURCE="$(git remote get-url origin 2>/dev/null || echo unknown)"

ARGS=(--build-arg "VERSION=$VERSION" --build-arg "VCS_REF=$VCS_REF" --build-arg "SOURCE=$SOURCE")
TAG="$REGISTRY/pirl:$VERSION"
if [ "$VARIANT" = "cpu" ]; then
  ARGS+=(--build-arg "BASE_IMAGE=python:3.11-slim"
         --build-arg "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
  TAG="$TAG-cpu"
fi

set -x
docker buildx build --file images/Dockerfile --platform "$PLATFORM" "${ARGS[@]}" \
  --tag "$TAG" "$OUTPUT" .
