#!/bin/sh
# Built-in step `nvidia-userspace`: the NVIDIA driver's userspace (libraries, nvidia-smi) at exactly the
# version the host's kernel driver reports through NVML, without the kernel module: an LXC shares the
# host's kernel, and a userspace of any other version fails with "Driver/library version mismatch".
# Input: NVIDIA_DRIVER_VERSION (from the host's NVML, set by the reconciler).
set -eu

VERSION="${NVIDIA_DRIVER_VERSION:?the reconciler sets NVIDIA_DRIVER_VERSION from the host}"
case "$VERSION" in
    *[!0-9.]* | "" | .* | *.) echo "nvidia-userspace: not a driver version: $VERSION" >&2; exit 2 ;;
esac

if command -v nvidia-smi >/dev/null 2>&1; then
    have="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)"
    if [ "$have" = "$VERSION" ]; then
        echo "nvidia-userspace: $VERSION is installed already"
        exit 0
    fi
fi

if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends ca-certificates curl kmod
elif command -v dnf >/dev/null 2>&1; then
    dnf install -y curl kmod
fi

URL="${NVIDIA_DRIVER_URL:-https://download.nvidia.com/XFree86/Linux-x86_64/$VERSION/NVIDIA-Linux-x86_64-$VERSION.run}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
curl -fsSL -o "$WORK/NVIDIA-Linux-x86_64-$VERSION.run" "$URL"
sh "$WORK/NVIDIA-Linux-x86_64-$VERSION.run" --no-kernel-module --silent --no-questions --ui=none
echo "nvidia-userspace: $VERSION installed"
