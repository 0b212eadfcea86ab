"""Runtimes that drive the algorithms: in-process simulation (default)."""
