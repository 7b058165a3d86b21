"""Prefect wiring only: the `force-compress` flow runs the stages as tasks."""
