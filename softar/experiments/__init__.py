"""Experiment sweeps and their reports."""
