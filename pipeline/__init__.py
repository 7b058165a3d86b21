"""Shared plumbing: configuration, data, run directories and artifacts, errors; `cli.py` sits on top."""
