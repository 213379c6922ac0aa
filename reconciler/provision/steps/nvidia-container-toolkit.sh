#!/bin/sh
# Built-in step `nvidia-container-toolkit`: NVIDIA's container toolkit from NVIDIA's package repository,
# configured as a Docker runtime. In an LXC the host owns the devices and cgroups, so the toolkit is told
# not to manage cgroups (no-cgroups = true), as unprivileged containers need.
set -eu

REPO="${NVIDIA_CONTAINER_REPO:-https://nvidia.github.io/libnvidia-container}"
ROOT="${RECONCILER_GUEST_ROOT:-}"  # a prefix for the files this step writes: empty in a guest, a folder in tests
KEYRING=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg

if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends ca-certificates curl gnupg
    mkdir -p "$ROOT/usr/share/keyrings" "$ROOT/etc/apt/sources.list.d"
    curl -fsSL "$REPO/gpgkey" | gpg --batch --yes --dearmor -o "$ROOT$KEYRING"
    curl -fsSL "$REPO/stable/deb/nvidia-container-toolkit.list" \
        | sed "s#deb https://#deb [signed-by=$KEYRING] https://#g" \
        > "$ROOT/etc/apt/sources.list.d/nvidia-container-toolkit.list"
    apt-get update -q
    apt-get install -y -q nvidia-container-toolkit
elif command -v dnf >/dev/null 2>&1; then
    mkdir -p "$ROOT/etc/yum.repos.d"
    curl -fsSL "$REPO/stable/rpm/nvidia-container-toolkit.repo" > "$ROOT/etc/yum.repos.d/nvidia-container-toolkit.repo"
    dnf install -y nvidia-container-toolkit
else
    echo "nvidia-container-toolkit: NVIDIA packages it for apt and dnf only" >&2
    exit 3
fi

if [ -e /proc/1/environ ] && tr '\0' '\n' < /proc/1/environ 2>/dev/null | grep -q '^container=lxc$'; then
    nvidia-ctk config --set nvidia-container-cli.no-cgroups=true --in-place
fi
nvidia-ctk runtime configure --runtime=docker
if command -v systemctl >/dev/null 2>&1; then
    systemctl restart docker
else
    service docker restart
fi
echo "nvidia-container-toolkit: installed and configured for Docker"
