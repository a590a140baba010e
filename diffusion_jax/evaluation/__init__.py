"""Evaluation: sample-quality metrics (metrics.py)."""
