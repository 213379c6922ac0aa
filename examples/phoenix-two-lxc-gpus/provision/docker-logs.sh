#!/bin/sh
# Docker's own log rotation, so that a chatty model server cannot fill the container's rootfs; then
# Docker restarted to read it. Runs after the built-in `docker` step. (RECONCILER_GUEST_ROOT is empty in
# a guest; the tests set it to a folder of their own.)
set -eu
ROOT="${RECONCILER_GUEST_ROOT:-}"
mkdir -p "$ROOT/etc/docker"
cat > "$ROOT/etc/docker/daemon.json" <<'JSON'
{"log-driver": "json-file", "log-opts": {"max-size": "50m", "max-file": "3"}}
JSON
if command -v systemctl >/dev/null 2>&1; then systemctl restart docker; else service docker restart; fi
echo "docker-logs: json-file logs, 3 x 50 MB"
