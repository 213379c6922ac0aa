#!/bin/sh
# The NVIDIA driver the seed runs (580.105.08, CUDA 13.0), kernel module included: this is a VM with
# its own kernel and two GPUs passed through. Ubuntu's packaged server driver of that branch, then a
# reboot is left to the operator (the step's `unless` check skips it once nvidia-smi reports 580.105.08).
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends nvidia-driver-580-server nvidia-utils-580-server
echo "nvidia-driver: 580 server branch installed; reboot the VM to load the module"
