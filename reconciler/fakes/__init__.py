"""Fakes of real components, for tests and the demo."""
