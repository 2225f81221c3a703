import os


# The suite is dominated by XLA compilation (hundreds of small programs, each run a
# few times), and LLVM's optimisation passes cost more compile time than they save
# in run time here: without them the suite runs ~20% faster. They change no
# semantics (no fast-math either way; results agree to round-off). Benchmarks, the
# CLI and the examples run outside the tests keep XLA's default. (XLA:CPU's classic
# emitters, `--xla_cpu_use_fusion_emitters=false`, would compile 2.5x faster again,
# but change round-off between programs that tests expect to agree to 1e-9 or
# bitwise: the SDE AdjointDEIS row of the matrix, the trajectory surrogate's value.)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0"
).strip()

# A persistent compilation cache in the user's cache directory (never the repo), also
# for the subprocesses the tests start: a warm cache halves the suite's CPU time. It
# changes no result (an executable is cached under a key of the program, the XLA
# flags and the versions, and is what XLA would compile); a cold run compiles all.
# Set ADJOINT_JAX_TEST_CACHE=0 to run without it.
if os.environ.get("ADJOINT_JAX_TEST_CACHE", "1") != "0":
    _cache = os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "adjoint_jax", "jax-compilation",
        # One directory per xdist worker: JAX's cache writes are not atomic, and a
        # worker reading an entry the other is writing warns "truncated stream".
        os.environ.get("PYTEST_XDIST_WORKER", "main"),
    )
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import pytest


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    keys = iter(jax.random.split(jax.random.key(5678), 1000))
    return lambda: next(keys)
