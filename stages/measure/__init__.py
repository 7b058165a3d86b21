"""Measuring a compressed model: its forms, their latency, the gate, and the validation report."""
