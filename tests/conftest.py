import os


# The suite is dominated by XLA compilation (hundreds of small programs, each run a
# few times), and LLVM's optimisation passes cost more compile time than they save
# in run time here: without them the suite runs ~20% faster. They change no
# semantics (no fast-math either way; results agree to round-off). Benchmarks, the
# CLI and the examples run outside the tests keep XLA's default.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax
import pytest


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    keys = iter(jax.random.split(jax.random.key(5678), 1000))
    return lambda: next(keys)
