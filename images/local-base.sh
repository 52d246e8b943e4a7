#!/usr/bin/env bash
# Make the base image for a local build where no registry is reachable: Debian bookworm
# (Python 3.11, the lock's Python) from Debian packages with debootstrap, imported into podman.
#   images/local-base.sh [NAME]      (default localhost/pirl-base:bookworm)
# Skips the work when NAME exists. MIRROR overrides the Debian mirror (default: the one apt uses).
set -euo pipefail
NAME="${1:-localhost/pirl-base:bookworm}"
if podman image exists "$NAME"; then
  echo "local-base: $NAME exists" >&2
  exit 0
fi
if [ -z "${MIRROR:-}" ]; then
  MIRROR="$(sed -n 's/^URIs: *\(.*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2> /dev/null | head -n 1)"
  MIRROR="${MIRROR:-$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2> /dev/null)}"
  MIRROR="${MIRROR:-http://deb.debian.org/debian}"
fi
ROOT="$(mktemp -d /var/tmp/pirl-base.XXXXXX)"
trap 'rm -rf "$ROOT"' EXIT
# minbase + the interpreter, venv (its ensurepip brings pip) and the CA store for TLS to S3/GCS.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$ROOT" "$MIRROR" > "$ROOT.log" 2>&1 || { tail -20 "$ROOT.log" >&2; exit 1; }
rm -f "$ROOT.log"
# What a runtime never needs: apt's package lists and caches, docs, man pages.
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/* "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/*
tar -C "$ROOT" -c . | podman import \
  --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$NAME" > /dev/null
echo "local-base: imported $NAME ($(podman image inspect --format '{{.Size}}' "$NAME") bytes)" >&2
