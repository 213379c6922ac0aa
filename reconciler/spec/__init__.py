"""Desired state: models, loader, validation, JSON Schema. Pure: no I/O beyond reading spec files."""
