"""Benchmarks of the operator, the models and the data loading (scripts; importable for their helpers)."""
