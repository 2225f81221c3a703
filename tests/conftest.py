import os


# The suite is dominated by XLA compilation (hundreds of small programs, each run a
# few times), and LLVM's optimisation passes and XLA:CPU's MLIR fusion emitters cost
# more compile time than they save in run time here: without the passes the suite
# runs ~20% faster, with the classic emitters its compilation ~35% faster again. They
# change no semantics (no fast-math either way); programs that differ (a vmap and a
# loop, two jits of one computation) still agree to round-off, which is what the
# tests assert. Benchmarks, the CLI and the examples run outside the tests keep
# XLA's defaults.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
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
        # One directory for the whole run: the xdist controller runs this first and
        # its workers inherit it, so a program one worker compiled is a hit for the
        # other. JAX writes entries non-atomically; an entry read while the other
        # worker writes it fails to decompress, and JAX warns and compiles (it
        # raises only with `jax_raise_persistent_cache_errors`, off by default).
        "main",
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


# Each compiled XLA:CPU executable holds ~3 memory mappings of its code until JAX's
# caches drop it, and an xdist worker compiles tens of thousands of programs: past
# the kernel's `vm.max_map_count` (65530 by default) LLVM's next mapping fails and
# the worker dies with a segmentation fault inside `backend_compile_and_load`. When
# a test leaves more than half that many mappings, the compilation caches are
# cleared (programs still in use recompile; no result changes).
def _max_map_count():
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


_MAP_LIMIT = _max_map_count()


def _memory_maps():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.fixture(autouse=True)
def _release_compiled_code():
    yield
    if _MAP_LIMIT is not None and _memory_maps() > _MAP_LIMIT // 2:
        jax.clear_caches()


# The longest tests (subprocesses with simulated devices, the examples, the scale
# benchmark) start first: pytest-xdist hands out tests in collection order, and one of
# them arriving last would leave the other worker idle at the end of the run.
_LONG_FIRST = ("test_sharding.py", "test_sharded_finetune.py", "test_multiprocess.py",
               "test_scale.py", "test_examples.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.fspath.basename not in _LONG_FIRST)
