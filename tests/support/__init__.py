"""Test support: real components (fakepve, a Docker engine, the fake NVML library, git) for the tests."""
