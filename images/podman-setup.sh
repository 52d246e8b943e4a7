#!/usr/bin/env bash
# Install podman (Debian packages) and configure it for this kind of machine: a root user in a
# sandbox whose cgroups are in hybrid mode and which may not raise RLIMIT_NOFILE. Idempotent.
#   - runtime runc: crun fails here with "cgroups in hybrid mode not supported";
#   - cgroup_manager cgroupfs: no systemd to delegate to;
#   - default_ulimits = []: the default nofile ulimit fails with "setrlimit RLIMIT_NOFILE:
#     Operation not permitted";
#   - events_logger file: no journald.
# An existing /etc/containers/containers.conf with other content is kept as
# containers.conf.pirl-backup before it is replaced.
set -euo pipefail

missing=()
for tool in podman runc debootstrap; do
  command -v "$tool" > /dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "podman-setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq podman runc debootstrap > /dev/null
fi

CONF=/etc/containers/containers.conf
WANT='[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"'
if [ "$(cat "$CONF" 2> /dev/null)" != "$WANT" ]; then
  mkdir -p /etc/containers
  if [ -s "$CONF" ]; then cp "$CONF" "$CONF.pirl-backup"; fi
  printf '%s\n' "$WANT" > "$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
  echo "podman-setup: wrote $CONF" >&2
fi
podman --version
