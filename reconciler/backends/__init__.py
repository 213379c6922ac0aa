"""Backends: the only code that talks to Proxmox, Docker and NVML. Each SDK lives in one module."""
