"""The gradient-accuracy and cost benchmark behind `adjoint-jax compare`.

For every (sampler, adjoint, number of steps N, differentiated input) it measures the
gradient's relative L2 error and cosine similarity against the continuous-time truth
(when the problem has one) and against the discrete truth (`aj.DTO()` through the same
sampler at the same N), the model evaluations of the forward and backward passes, the
compile time, the median wall time of the jitted gradient and of the jitted sampler,
and the XLA temporary memory of the jitted gradient.

The same measurement runs on a user's own model through `Problem`:

```python
import adjoint_jax as aj
from adjoint_jax.bench import Problem, compare

problem = Problem(
    name="mine", model=model, params=params, x_T=x_T, cond=cond,
    schedule=aj.VPLinear(), loss=lambda x0: jnp.mean((x0 - target) ** 2),
)
records = compare(problem, [aj.DPMSolver2()], [aj.DTO(), aj.AdjointDEIS()],
                  steps=[10, 20, 40], wrt=["xT", "params"])
```
"""

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import adjoint_jax as aj

from ._count import EvalCount, counting_model
from ._orders import add_slopes
from ._pairs import valid_pairs
from ._problem import Problem


WRT = ("xT", "cond", "params", "all")
# Position of each differentiated input among (params, x_T, cond).
_ARGNUM = {"params": 0, "xT": 1, "cond": 2}

# The keys of one record, in the order of the CSV columns.
FIELDS = (
    "problem",
    "sampler",
    "adjoint",
    "steps",
    "wrt",
    "rel_error",
    "cosine",
    "rel_error_discrete",
    "cosine_discrete",
    "slope",
    "slope_discrete",
    "asymptotic",
    "nfe_forward",
    "nfe_backward",
    "vjp_backward",
    "grad_time_s",
    "sample_time_s",
    "ratio",
    "temp_bytes",
    "compile_time_s",
    "dtype",
    "batch",
)


# ---- measurement ------------------------------------------------------------------
def _flat(tree) -> np.ndarray:
    leaves = [np.ravel(np.asarray(leaf, np.float64)) for leaf in jtu.tree_leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def errors(grad, truth) -> tuple[float, float]:
    """(relative L2 error, cosine similarity) of `grad` against `truth` over all
    leaves; NaNs if the truth is unknown (`None`)."""
    if truth is None or grad is None:
        return math.nan, math.nan
    g, t = _flat(grad), _flat(truth)
    if g.shape != t.shape:
        raise ValueError(f"gradient of size {g.size} against a truth of size {t.size}")
    nt, ng = np.linalg.norm(t), np.linalg.norm(g)
    rel = float(np.linalg.norm(g - t) / nt) if nt > 0 else math.nan
    cos = float(np.dot(g, t) / (ng * nt)) if ng > 0 and nt > 0 else math.nan
    return rel, cos


def _pick(grads, wrt: str):
    """The component of a (g_params, g_x_T, g_cond) triple for `wrt`."""
    if grads is None:
        return None
    if wrt == "all":
        return None if any(g is None for g in grads) else tuple(grads)
    return grads[_ARGNUM[wrt]]


class _Counter:
    """Model evaluations and model VJPs, counted by construction (`count_evals`'s
    instrumented model: `jax.debug.callback`s in a `jax.custom_vjp`), resettable."""

    def __init__(self, model):
        self.count = EvalCount()
        self.model = counting_model(model, self.count)

    def reset(self):
        self.count.forward = 0
        self.count.vjp = 0

    @property
    def evals(self):
        return self.count.forward

    @property
    def vjps(self):
        return self.count.vjp


def _median_time(fn, args, repeats: int, min_time: float) -> float:
    jax.block_until_ready(fn(*args))  # warm-up
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_time and len(times) < 1000):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# The counting runs are never timed: compile them with the cheapest backend
# optimisation (about a third less compile time; the same values to round-off).
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _run_once(fn, args):
    out = jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)
    out = jax.block_until_ready(out)
    jax.effects_barrier()
    return out


def _compile(fn, args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    elapsed = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = int(mem.temp_size_in_bytes) if mem is not None else -1
    return compiled, elapsed, temp


def compare(
    problem: Problem,
    samplers: Sequence | None = None,
    adjoints: Sequence | None = None,
    steps: Sequence[int] = (10, 20, 40, 80),
    wrt: Sequence[str] = ("xT",),
    *,
    pairs: Sequence[tuple] | None = None,
    repeats: int = 5,
    min_time: float = 0.05,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Measures every (sampler, adjoint) pair at every N in `steps` and for every input
    in `wrt`.

    **Arguments:**

    - `problem`: a `Problem` (built-in ones from `make_problem`).
    - `samplers`, `adjoints`: the strategies (default: `default_samplers()`,
        `default_adjoints()`); every valid pair of them is measured.
    - `steps`: the numbers of sampler steps N.
    - `wrt`: the differentiated inputs, each one of `"xT"`, `"cond"`, `"params"`,
        `"all"` (all three at once).
    - `pairs`: explicit (sampler, adjoint) pairs instead of `samplers` × `adjoints`;
        an invalid pair raises `ValueError`.
    - `repeats`, `min_time`: each wall time is the median of at least `repeats`
        jitted runs after one warm-up run, and of enough runs to fill `min_time`
        seconds.
    - `progress`: called with a short description before each measurement.

    **Returns:** a list of records, one per sampler × adjoint × N × input: dicts with
    the keys `problem`, `sampler`, `adjoint` (reprs), `steps`, `wrt`, `rel_error`,
    `cosine` (against the continuous truth), `rel_error_discrete`, `cosine_discrete`
    (against DTO), `slope`, `slope_discrete`, `asymptotic` (the fitted orders),
    `nfe_forward`, `nfe_backward`, `vjp_backward`, `grad_time_s`, `sample_time_s`,
    `ratio`, `temp_bytes`, `compile_time_s`, `dtype` and `batch` (the CSV's columns,
    in that order). Errors are NaN where no truth is known; `nfe_backward` is the
    number of model evaluations of the gradient minus that of the sampler alone,
    `vjp_backward` the number of model VJPs; `ratio` is gradient time / sampling
    time; `temp_bytes` is XLA's compiled temporary memory of the jitted gradient.
    """
    wrt = list(wrt)
    pairs = _checked(problem, wrt, steps, pairs, samplers, adjoints)
    counter = _Counter(problem.model)
    truths: dict[bool, Any] = {}
    records = []
    for sampler, sampler_adjoints in _by_sampler(pairs):
        if sampler.is_sde not in truths:
            fn = problem.truth_for(sampler)
            args = (problem.params, problem.x_T, problem.cond)
            truths[sampler.is_sde] = None if fn is None else _pad(fn(*args))
        for n in steps:
            records += _measure(
                problem, sampler, sampler_adjoints, n, wrt, counter,
                truths[sampler.is_sde], repeats, min_time, progress,
            )
    # One block per pair, by N, then by input.
    pair_rank = {(repr(s), repr(a)): i for i, (s, a) in enumerate(pairs)}
    step_rank = {n: i for i, n in enumerate(steps)}
    records.sort(
        key=lambda r: (
            pair_rank[(r["sampler"], r["adjoint"])],
            step_rank[r["steps"]],
            wrt.index(r["wrt"]),
        )
    )
    return add_slopes(records)


def _checked(problem, wrt, steps, pairs, samplers, adjoints) -> list:
    """The pairs to measure, after checking `wrt`, `steps` and explicit pairs."""
    for w in wrt:
        if w not in WRT:
            raise ValueError(f"unknown wrt {w!r}; choose from: {', '.join(WRT)}")
        if problem.cond is None and w in ("cond", "all"):
            raise ValueError(
                f"wrt={w!r} needs a problem with conditioning (cond is None)"
            )
    for n in steps:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"steps must be positive integers; got {n!r}")
    if pairs is None:
        return valid_pairs(samplers, adjoints)
    pairs = list(pairs)
    for s, a in pairs:
        a.check_sampler(s)
    return pairs


def _by_sampler(pairs) -> list[tuple]:
    """[(sampler, [its adjoints])], samplers in order of first appearance."""
    groups: dict[str, tuple] = {}
    for s, a in pairs:
        groups.setdefault(repr(s), (s, []))[1].append(a)
    return list(groups.values())


def _pad(g) -> tuple:
    return tuple(g) + (None,) * (3 - len(g))


def _describe(problem) -> tuple[str, int]:
    leaf = jtu.tree_leaves(problem.x_T)[0]
    return str(leaf.dtype), int(leaf.shape[0]) if jnp.ndim(leaf) > 1 else 1


def _measure(problem, sampler, adjoints, n, wrt, counter, truth, repeats, min_time,
             progress) -> list[dict]:
    """The records of one sampler at one N: its evaluations and wall time alone, then
    for each adjoint the counted gradient (errors against `truth` and against DTO) and,
    for each input in `wrt`, the compiled gradient's time and memory."""
    args = (problem.params, problem.x_T, problem.cond)
    argnums_all = (0, 1, 2) if problem.cond is not None else (0, 1)
    loss, ts = problem.loss_for(sampler), problem.ts(n)
    key = problem.key if sampler.is_sde else None
    dtype, batch = _describe(problem)

    def sample_with(model, adjoint):
        return lambda p, x, c: aj.sample(
            model, p, x, c, schedule=problem.schedule, ts=ts, sampler=sampler,
            adjoint=adjoint, key=key,
        )

    def loss_with(model, adjoint):
        f = sample_with(model, adjoint)
        return lambda p, x, c: loss(f(p, x, c))

    def counted_grads(adjoint):
        counter.reset()
        g = _run_once(jax.grad(loss_with(counter.model, adjoint), argnums_all), args)
        return _pad(g), counter.evals, counter.vjps

    # The sampler alone: its model evaluations and its wall time.
    counter.reset()
    _run_once(sample_with(counter.model, aj.DTO()), args)
    nfe_forward = counter.evals
    sample_c, _, _ = _compile(sample_with(problem.model, aj.DTO()), args)
    sample_time = _median_time(sample_c, args, repeats, min_time)
    records, discrete = [], None
    for adjoint in adjoints:
        if progress is not None:
            progress(f"{sampler!r} {adjoint!r} N={n}")
        grads, evals, vjps = counted_grads(adjoint)
        if discrete is None:
            discrete = grads if adjoint == aj.DTO() else counted_grads(aj.DTO())[0]
        for w in wrt:
            argnums = argnums_all if w == "all" else _ARGNUM[w]
            fn = jax.grad(loss_with(problem.model, adjoint), argnums)
            compiled, compile_time, temp = _compile(fn, args)
            grad_time = _median_time(compiled, args, repeats, min_time)
            rel, cos = errors(_pick(grads, w), _pick(truth, w))
            rel_d, cos_d = errors(_pick(grads, w), _pick(discrete, w))
            records.append(dict(
                problem=problem.name, sampler=repr(sampler), adjoint=repr(adjoint),
                steps=n, wrt=w, rel_error=rel, cosine=cos, rel_error_discrete=rel_d,
                cosine_discrete=cos_d, slope=math.nan, slope_discrete=math.nan,
                asymptotic=False, nfe_forward=nfe_forward,
                nfe_backward=evals - nfe_forward, vjp_backward=vjps,
                grad_time_s=grad_time, sample_time_s=sample_time,
                ratio=grad_time / sample_time, temp_bytes=temp,
                compile_time_s=compile_time, dtype=dtype, batch=batch,
            ))
    return records
