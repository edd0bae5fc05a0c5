"""Benchmarks of lesion against the peers a user would otherwise pick; run each as ``python -m benchmarks.NAME``."""
