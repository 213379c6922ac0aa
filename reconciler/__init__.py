"""reconciler: a GitOps reconciler for GPU homelabs."""

__version__ = "0.1.0"
