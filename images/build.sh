#!/usr/bin/env bash
# Build (and with --push, push) the trainer/pipeline image with docker buildx, or here with podman.
# Tags: REGISTRY/pirl:VERSION-<git sha> always (immutable: one commit, one image), and
# REGISTRY/pirl:VERSION only for a release (HEAD carries the git tag vVERSION and the tree is
# clean), so the VERSION tag the manifests and the pipeline default to is never overwritten.
# The CPU variant appends -cpu to both.
#
#   images/build.sh [--cpu] [--push] [--platform linux/amd64]
#   REGISTRY=ghcr.io/acme images/build.sh --push
#   images/build.sh --local        (this machine: podman, a debootstrapped Debian base, pip from
#                                   this machine's configuration; REGISTRY defaults to localhost)
#
# Without --push the image is loaded into the local Docker engine (--load).
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."

PLATFORM="linux/amd64"
VARIANT="gpu"
OUTPUT="--load"
LOCAL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) VARIANT="cpu" ;;
    --push) OUTPUT="--push" ;;
    --local) LOCAL=1 ;;
    --platform) PLATFORM="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$SELF"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$LOCAL" = 1 ]; then
  REGISTRY="${REGISTRY:-localhost}"
else
  REGISTRY="${REGISTRY:-registry.example.com/ml}"
fi

VERSION="$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n 1)"
if [ -z "$VERSION" ]; then
  echo "build.sh: no version = \"...\" line in pyproject.toml" >&2
  exit 2
fi
VCS_REF="$(git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)"
SOURCE="$(git remote get-url origin 2>/dev/null || echo unknown)"
SUFFIX=""
[ "$VARIANT" = "cpu" ] && SUFFIX="-cpu"

TAGS=("$REGISTRY/pirl:$VERSION-${VCS_REF:0:12}$SUFFIX")
if [ "$VCS_REF" != unknown ] && git describe --exact-match --tags HEAD 2>/dev/null | grep -qx "v$VERSION" \
   && [ -z "$(git status --porcelain 2>/dev/null)" ]; then
  TAGS+=("$REGISTRY/pirl:$VERSION$SUFFIX")
else
  echo "build.sh: not a release (HEAD is not tagged v$VERSION with a clean tree): tagging ${TAGS[0]} only" >&2
fi

ARGS=(--build-arg "VERSION=$VERSION" --build-arg "VCS_REF=$VCS_REF" --build-arg "SOURCE=$SOURCE")
if [ "$VARIANT" = "cpu" ]; then
  ARGS+=(--build-arg "BASE_IMAGE=python:3.11-slim"
         --build-arg "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
fi
TAG_ARGS=()
for tag in "${TAGS[@]}"; do TAG_ARGS+=(--tag "$tag"); done

if [ "$LOCAL" = 0 ]; then
  set -x
  docker buildx build --file images/Dockerfile --platform "$PLATFORM" "${ARGS[@]}" \
    "${TAG_ARGS[@]}" "$OUTPUT" .
  exit 0
fi

# --local: podman (installed and configured by podman-setup.sh), a Debian base of the lock's
# Python made from Debian packages, and pip configured like this machine's pip, through mounts
# that exist only while a RUN step runs (nothing of them is left in the image).
if [ "$VARIANT" = "cpu" ] || [ "$OUTPUT" = "--push" ]; then
  echo "build.sh: --local builds the default variant into podman's store (no --cpu, no --push)" >&2
  exit 2
fi
images/podman-setup.sh > /dev/null
if [ -z "$(git status --porcelain 2>/dev/null)" ] && [ "$VCS_REF" != unknown ] \
   && [ -z "${FORCE:-}" ] && podman image exists "${TAGS[0]}"; then
  echo "build.sh: ${TAGS[0]} exists (this commit, clean tree): nothing to do (FORCE=1 rebuilds)" >&2
  exit 0
fi
BASE="${LOCAL_BASE_IMAGE:-localhost/pirl-base:bookworm}"
images/local-base.sh "$BASE"
PIPCONF="$(mktemp -d /var/tmp/pirl-pip.XXXXXX)"
trap 'rm -rf "$PIPCONF"' EXIT
MOUNTS=(--volume "$PIPCONF:/etc/xdg/pip:ro")
CA="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
# Where this machine's pip finds wheels (find-links folders, file:// indexes), each once.
LINKS="$(printf '%s\n' $(pip config get global.find-links 2>/dev/null || true) ${PIP_FIND_LINKS:-} | awk 'NF && !seen[$0]++')"
INDEXES="$(printf '%s\n' $(pip config get global.extra-index-url 2>/dev/null || true) ${PIP_EXTRA_INDEX_URL:-} | awk 'NF && !seen[$0]++')"
find_links=""
extra_indexes=""
for dir in $LINKS; do
  if [ -d "$dir" ]; then find_links="$find_links $dir"; MOUNTS+=(--volume "$dir:$dir:ro"); fi
done
for url in $INDEXES; do
  dir="${url#file://}"
  if [ "$dir" = "$url" ]; then
    extra_indexes="$extra_indexes $url"  # a remote index: reachable with --network=host
  elif [ -d "$dir" ]; then
    root="$(dirname "$dir")"  # the index's files sit beside simple/: mount its parent
    extra_indexes="$extra_indexes $url"; MOUNTS+=(--volume "$root:$root:ro")
  fi
done
{
  echo "[global]"
  # A proxy that re-signs TLS: PyPI is reachable only with this machine's CA bundle.
  if [ -f "$CA" ]; then cp "$CA" "$PIPCONF/ca-bundle.crt"; echo "cert = /etc/xdg/pip/ca-bundle.crt"; fi
  if [ -n "$find_links" ]; then echo "find-links =$find_links"; fi
  if [ -n "$extra_indexes" ]; then echo "extra-index-url =$extra_indexes"; fi
} > "$PIPCONF/pip.conf"

start=$(date +%s)
set -x
podman build --file images/Dockerfile --network=host --layers=false \
  --build-arg "BASE_IMAGE=$BASE" "${ARGS[@]}" "${MOUNTS[@]}" \
  "${TAG_ARGS[@]}" .
set +x
# Each build is ~6.4 GB: keep only this one (the other tags of REGISTRY/pirl, and anything left
# dangling), so repeated builds do not fill the disk.
for old in $(podman images --noheading --format '{{.Repository}}:{{.Tag}}' --filter "reference=$REGISTRY/pirl"); do
  case " ${TAGS[*]} " in *" $old "*) ;; *) podman rmi "$old" > /dev/null && echo "build.sh: removed $old" >&2 ;; esac
done
podman image prune --force > /dev/null
echo "build.sh: built ${TAGS[*]} in $(( $(date +%s) - start )) s," \
  "$(podman image inspect --format '{{.Size}}' "${TAGS[0]}") bytes" >&2
