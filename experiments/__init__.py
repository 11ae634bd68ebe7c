"""Experiment configs, comparison scripts and benchmarks."""
