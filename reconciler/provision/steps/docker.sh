#!/bin/sh
# Built-in step `docker`: the Docker engine from the guest distribution's own packages, enabled and started.
# Run by the reconciler over SSH as root; safe to run again (the package managers skip what is installed).
set -eu

if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends docker.io
elif command -v dnf >/dev/null 2>&1; then
    dnf install -y moby-engine || dnf install -y docker
elif command -v apk >/dev/null 2>&1; then
    apk add --no-cache docker
    rc-update add docker default
    rc-service docker start
    exit 0
else
    echo "docker: no apt-get, dnf or apk in this guest; install Docker with a script step instead" >&2
    exit 3
fi

if command -v systemctl >/dev/null 2>&1; then
    systemctl enable --now docker
else
    service docker start
fi
echo "docker: engine installed and started"
