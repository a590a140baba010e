"""Shared test set-up: CPU only, and small helpers."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
