import gc
import os


# The suite is dominated by XLA compilation (hundreds of small programs, each run a
# few times), and LLVM's optimisation passes and XLA:CPU's MLIR fusion emitters cost
# more compile time than they save in run time here: without the passes the suite
# runs ~20% faster, with the classic emitters its compilation ~35% faster again.
# XLA:CPU also splits each module's code generation into up to 32 parts compiled on
# threads; with two pytest workers on two cores the threads only compete, and one
# part compiles ~17% faster (backend compile 21.7 s -> 18.2 s on
# test_diffusers_singlestep.py, cold cache). None of this changes semantics (no
# fast-math either way); programs that differ (a vmap and a loop, two jits of one
# computation) still agree to round-off, which is what the tests assert. Benchmarks,
# the CLI and the examples run outside the tests keep XLA's defaults.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    + " --xla_cpu_parallel_codegen_split_count=1"
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
# a test leaves more than three quarters of that many mappings, the compilation caches
# are cleared (programs still in use recompile; no result changes). The quarter left
# (16,000 mappings by default) is over ten times what the busiest test adds (452
# compilations, test_examples.py::test_implicit_adjoint_matching); each clear costs
# 3-5 s (the executables' code is unmapped) and the retracing that follows, which
# the earlier threshold of one half paid three times a run.
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
    if _MAP_LIMIT is not None and _memory_maps() > 3 * _MAP_LIMIT // 4:
        jax.clear_caches()


# Python's cyclic garbage collector rescans every tracked object in a full
# collection, and a worker holds millions of them (JAX, torch and diffusers, the test
# modules, JAX's caches of traces): full collections took ~6% of the suite's CPU time
# (12 s of 175 s on four of the heaviest files). What exists when collection ends
# lives to the end anyway, so it is frozen (never scanned again), and the young
# generation is collected every 50,000 allocations instead of 700 (tracing allocates
# and frees millions of small objects). Together: 12 s -> 2 s on those files, the
# same peak memory (2.5 GB). Reference counting frees everything as before; only
# cycles wait a little longer.
def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


# Under `-n`, pytest-xdist hands out whole files (`--dist loadfile`) in the order of
# the collection (`--no-loadscope-reorder`; by default it would order them by their
# number of tests, which put the 4-test, 60-second sharding file near the end). The
# heaviest files go first, longest first, so that what is left at the end of the run
# is small files that keep both workers busy. Their test-seconds (2-core AMD EPYC,
# cold cache, 2026-12-04): 129, 57, 52, 46, 44, 38, 38, 37, 31, 30, 26, 25, 25, 24,
# 22, 21, 21, 21, 20, 19; every other file under 19. A stale order costs wall time
# only.
_HEAVY_FIRST = (
    "test_matrix.py", "test_examples.py", "test_sharding.py",
    "test_continuous_adjoints.py", "test_robustness.py", "test_zero_length_steps.py",
    "test_diffusers_singlestep.py", "test_samplers.py",
    "test_implicit_adjoint_matching.py", "test_sample.py", "test_scale.py",
    "test_adjoint_dpm.py", "test_reversible.py", "test_research_code.py",
    "test_reversible_float32.py", "test_exp_rk.py", "test_zoo.py", "test_truncated.py",
    "test_diffusers_dpm.py", "test_sharded_finetune.py",
)
_RANK = {name: i for i, name in enumerate(_HEAVY_FIRST)}


def pytest_collection_modifyitems(items):
    # (A stable sort: each file's tests keep their order.)
    items.sort(key=lambda item: _RANK.get(item.fspath.basename, len(_RANK)))
