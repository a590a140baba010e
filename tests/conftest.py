"""Shared test set-up: CPU only, and small helpers."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Tests run tiny models: XLA's optimisation passes cost more compile time than they save.
jax.config.update("jax_disable_most_optimizations", True)
