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

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

import adjoint_jax as aj

from ._count import EvalCount, counting_model


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


# ---- problems ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """A benchmark problem: a model, its inputs, a loss and optionally the truth.

    **Arguments:**

    - `name`: a label for the records.
    - `model`: the ε-network, `model(params, x, t, cond) -> ε` (as for `aj.sample`).
    - `params`, `x_T`, `cond`: the inputs the gradients are taken with respect to
        (`cond` may be `None`; then `wrt="cond"` is refused).
    - `schedule`: the noise schedule.
    - `loss`: `loss(x_0) -> scalar`, the loss on the sample.
    - `truth`: optional `truth(params, x_T, cond) -> (g_params, g_x_T, g_cond)`, the
        continuous-time gradient of `loss` through the exact probability-flow map
        (any entry may be `None` if unknown). Without it the continuous-truth columns
        are NaN and only the discrete errors (against `aj.DTO()`) are reported.
    - `sde_loss`, `sde_truth`: the same for stochastic samplers (`sampler.is_sde`);
        `sde_loss` defaults to `loss`, `sde_truth` to none.
    - `t_end`, `t_start`, `spacing`: the time grid, see `aj.time_grid`.
    - `key`: the PRNG key of stochastic samplers.
    """

    name: str
    model: Callable
    params: PyTree
    x_T: PyTree
    cond: PyTree
    schedule: aj.AbstractSchedule
    loss: Callable
    truth: Callable | None = None
    sde_loss: Callable | None = None
    sde_truth: Callable | None = None
    t_end: float = 1e-3
    t_start: float | None = None
    spacing: str = "logsnr"
    key: Any = dataclasses.field(default_factory=lambda: jax.random.key(0))

    def ts(self, num_steps: int):
        return aj.time_grid(
            self.schedule,
            num_steps,
            t_start=self.t_start,
            t_end=self.t_end,
            spacing=self.spacing,
        )

    def loss_for(self, sampler: aj.AbstractSampler) -> Callable:
        if sampler.is_sde and self.sde_loss is not None:
            return self.sde_loss
        return self.loss

    def truth_for(self, sampler: aj.AbstractSampler) -> Callable | None:
        return self.sde_truth if sampler.is_sde else self.truth


def _weights(dim: int, dtype) -> jax.Array:
    base = [1.0, -2.0, 0.5, 1.5, -1.0, 0.75, -0.5, 2.0]
    return jnp.asarray([base[k % len(base)] for k in range(dim)], dtype)


def _rows(w, x):
    """`w` (shape `(dim,)`) broadcast against the rows of `x` (shape `(..., dim)`)."""
    return jnp.broadcast_to(w, x.shape)


def _nonlinear_loss(w):
    # Nonlinear, so the gradient depends on where x_0 lands; mean over the batch.
    def loss(x0):
        scale = x0.size // x0.shape[-1]
        return (jnp.sum(_rows(w, x0) * jnp.sin(x0)) + 0.5 * jnp.sum(x0 * x0)) / scale

    return loss


def _linear_loss(w):
    def loss(x0):
        return jnp.sum(_rows(w, x0) * x0) / (x0.size // x0.shape[-1])

    return loss


def _normal(seed: int, shape, dtype):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64).astype(dtype)


def _f64(tree):
    return jtu.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def gaussian_problem(
    dim: int = 4, batch: int = 1, dtype=jnp.float64, seed: int = 0
) -> Problem:
    """Gaussian data N(μ + c, diag(s²)) (`GaussianProblem`): closed-form truth, both
    for the probability-flow ODE (grad of the loss through `flow_map`) and, with a
    linear loss, for the SDE (`sde_linear_grads`; the truth for ∂/∂s is unknown
    there, so `wrt="params"` has no continuous truth with SDE samplers). Needs
    `jax_enable_x64` (the truth is computed in float64)."""
    from ._problems import GaussianProblem

    pb = GaussianProblem.make(dim, dtype=dtype)
    pb64 = GaussianProblem.make(dim)
    # The model is elementwise in x; vmap over the batch keeps it rank-clean.
    model = jax.vmap(
        lambda p, x, t, c: pb.model(p, x, t, c), in_axes=(None, 0, None, None)
    )
    x_T = _normal(seed, (batch, dim), dtype)
    cond = jnp.asarray([0.1 * math.cos(1.0 + k) for k in range(dim)], dtype)
    w, w64 = _weights(dim, dtype), _weights(dim, jnp.float64)
    t0, t_end = pb.schedule.t_max, 1e-3
    loss64 = _nonlinear_loss(w64)

    flow_map = jax.vmap(
        lambda p, x, c: pb64.flow_map(p, x, c, t0, t_end), in_axes=(None, 0, None)
    )

    def truth(params, x_T, cond):
        def f(p, x, c):
            return loss64(flow_map(p, x, c))

        return jax.grad(f, argnums=(0, 1, 2))(*_f64((params, x_T, cond)))

    def sde_truth(params, x_T, cond):
        params, x_T, cond = _f64((params, x_T, cond))
        ex = pb64.sde_linear_grads(w64, params, cond, t0, t_end)
        g_x = jnp.broadcast_to(ex["x_T"], x_T.shape) / batch
        return None, g_x, ex["mu"]  # the loss is a batch mean: ∂/∂μ is per row

    return Problem(
        name="gaussian",
        model=model,
        params=pb.params,
        x_T=x_T,
        cond=cond,
        schedule=pb.schedule,
        loss=_nonlinear_loss(w),
        truth=truth,
        sde_loss=_linear_loss(w),
        sde_truth=sde_truth,
        t_end=t_end,
    )


def mixture_problem(
    dim: int = 2, batch: int = 1, dtype=jnp.float64, seed: int = 0
) -> Problem:
    """A Gaussian mixture with sharp components (`MixtureProblem`): analytic,
    nonlinear ε; the continuous truth is `jax.grad` through its converged diffrax
    reference solve (Dopri8, rtol = atol = 1e-10, float64). No truth for SDE
    samplers (discrete errors only)."""
    from ._mixture import MixtureProblem

    pb = MixtureProblem.make(dim, dtype=dtype)
    pb64 = MixtureProblem.make(dim)
    x_T = _normal(seed, (batch, dim), dtype)
    cond = jnp.asarray([0.02 * math.cos(1.0 + k) for k in range(dim)], dtype)
    w, w64 = _weights(dim, dtype), _weights(dim, jnp.float64)
    t0, t_end = pb.schedule.t_max, 1e-3
    loss64 = _nonlinear_loss(w64)

    def truth(params, x_T, cond):
        def f(p, x, c):
            return loss64(pb64.reference(p, x, c, t0, t_end))

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*_f64((params, x_T, cond)))

    return Problem(
        name="mixture",
        model=lambda p, x, t, c: pb.model(p, x, t, c),
        params=pb.params,
        x_T=x_T,
        cond=cond,
        schedule=pb.schedule,
        loss=_nonlinear_loss(w),
        truth=truth,
        t_end=t_end,
    )


def mlp_problem(
    dim: int = 4,
    batch: int = 1,
    dtype=jnp.float64,
    seed: int = 0,
    width: int = 32,
    cond_dim: int = 2,
) -> Problem:
    """A random-weight MLP ε-network (`MLPProblem`). The continuous truth is
    `jax.grad` through a converged diffrax solve of its probability-flow ODE (Dopri8,
    rtol = atol = 1e-10, the weights cast to float64); none for SDE samplers (discrete
    errors only). With a large `width` and `batch` the model dominates the cost, which
    is what the time ratios are about."""
    from ._mixture import reference_flow
    from ._problems import MLPProblem

    pb = MLPProblem.make(
        jax.random.key(seed), dim=dim, width=width, cond_dim=cond_dim, dtype=dtype
    )
    x_T = _normal(seed + 1, (batch, dim), dtype)
    cond = jnp.asarray([0.5 * math.cos(1.0 + k) for k in range(cond_dim)], dtype)
    t0, t_end = pb.schedule.t_max, 1e-3
    loss64 = _nonlinear_loss(_weights(dim, jnp.float64))

    def truth(params, x_T, cond):
        def f(p, x, c):
            return loss64(reference_flow(pb.model, pb.schedule, p, x, c, t0, t_end))

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*_f64((params, x_T, cond)))

    return Problem(
        name="mlp",
        model=lambda p, x, t, c: pb.model(p, x, t, c),
        params=pb.params,
        x_T=x_T,
        cond=cond,
        schedule=pb.schedule,
        loss=_nonlinear_loss(_weights(dim, dtype)),
        truth=truth,
        t_end=t_end,
    )


def digits_problem(
    dim: int | None = None, batch: int = 8, dtype=jnp.float32, seed: int = 0
) -> Problem:
    """The shipped trained digits model (`aj.zoo.digits()`, needs flax): guidance
    of class-conditional samples towards the next class, loss = the classifier's
    cross-entropy. No continuous truth: discrete errors (against `aj.DTO()`) only.
    The network computes in float32 whatever `dtype` is."""
    del dim
    from ..zoo import digits

    d = digits()
    x_T = _normal(seed + 1, (batch, *d.shape), dtype)
    labels = jnp.arange(batch) % d.num_classes
    targets = (labels + 1) % d.num_classes

    def loss(x0):
        logits = d.classify(x0).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(logp, targets[:, None], axis=-1)
        return jnp.mean(ce).astype(x0.dtype)

    return Problem(
        name="digits",
        model=d.model,
        params=d.params,
        x_T=x_T,
        cond=d.cond(labels).astype(dtype),
        schedule=d.schedule,
        loss=loss,
        t_end=1e-3,
    )


PROBLEMS = {
    "gaussian": gaussian_problem,
    "mixture": mixture_problem,
    "mlp": mlp_problem,
    "digits": digits_problem,
}


def make_problem(name: str, **kwargs) -> Problem:
    """A built-in problem by name (`"gaussian"`, `"mixture"`, `"mlp"`, `"digits"`);
    `kwargs` go to its factory (`dim`, `batch`, `dtype`, `seed`, and `width` for
    `"mlp"`)."""
    if name not in PROBLEMS:
        raise ValueError(
            f"unknown problem {name!r}; choose from: {', '.join(PROBLEMS)}"
        )
    if name != "mlp":
        kwargs.pop("width", None)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return PROBLEMS[name](**kwargs)


# ---- strategies -------------------------------------------------------------------
# Classes that need arguments or have variants worth measuring; every other public
# sampler and adjoint enrols automatically at its default settings.
_PREFERRED_SAMPLERS = (
    "DPMSolver1",
    "DPMSolver2",
    "DPMSolverPP",
    "DDIM",
    "SDEDPMSolver1",
    "ReversibleHeun",
    "AsyncLeapfrog",
    "BELM",
    "BDIA",
    "EDICT",
    "McCallumFoster",
)
_PREFERRED_ADJOINTS = (
    "DTO",
    "AdjointDEIS",
    "RecordedAdjoint",
    "InterpolatedAdjoint",
    "AdjointDPM",
    "ReversibleAdjoint",
)


def _variants(kind: str, name: str):
    table = {
        "McCallumFoster": lambda: [aj.McCallumFoster(aj.DPMSolver2())],
        "DDIM": lambda: [aj.DDIM(), aj.DDIM(eta=1.0)],
        "DPMSolverPP": lambda: [
            aj.DPMSolverPP(),
            aj.DPMSolverPP(order=3),
            aj.DPMSolverPP(order=3, third_order="taylor"),
        ],
        "DTO": lambda: [aj.DTO(), aj.DTO(checkpoints="steps"), aj.DTO(checkpoints=4)],
        "AdjointDEIS": lambda: [aj.AdjointDEIS(), aj.AdjointDEIS(order=2)],
        "RecordedAdjoint": lambda: [aj.RecordedAdjoint(), aj.RecordedAdjoint(order=2)],
    }
    if name in table:
        return table[name]()
    cls = getattr(aj, name)
    try:
        return [cls()]
    except TypeError:  # needs arguments and has no entry above: not enrolled
        return []


def _public_names(base, preferred) -> list[str]:
    names = [
        n
        for n, obj in vars(aj).items()
        if isinstance(obj, type)
        and issubclass(obj, base)
        and not n.startswith("Abstract")
    ]
    rank = {n: i for i, n in enumerate(preferred)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _dedupe(objs):
    seen, out = set(), []
    for o in objs:
        if repr(o) not in seen:
            seen.add(repr(o))
            out.append(o)
    return out


# The main job's default (`adjoint-jax compare` with no --samplers/--adjoints): each
# family once, DTO after every sampler (the exact gradient, and each sampler's order),
# the checkpointed DTOs, the continuous adjoints and every reversible pair, so that a
# run takes minutes and every panel of the figures stays readable. (Truncated backprop
# is left out: its default ∂L/∂x_T is zero by design; measure it with --wrt params.)
# `--all` measures every valid pair of every public strategy instead.
OVERVIEW = (
    ("DPMSolver1()", "DTO()"),
    ("DPMSolver2()", "DTO()"),
    ("DPMSolverPP()", "DTO()"),
    ("DPMSolverPP(order=3, third_order='taylor')", "DTO()"),
    ("SDEDPMSolver1()", "DTO()"),
    ("ReversibleHeun()", "DTO()"),
    ("AsyncLeapfrog()", "DTO()"),
    ("BELM()", "DTO()"),
    ("McCallumFoster(DPMSolver2())", "DTO()"),
    ("DPMSolverPP()", "DTO(checkpoints='steps')"),
    ("DPMSolverPP()", "DTO(checkpoints=4)"),
    ("DPMSolver1()", "AdjointDEIS()"),
    ("DPMSolver2()", "AdjointDEIS(order=2)"),
    ("DPMSolver2()", "InterpolatedAdjoint(order=2)"),
    ("DPMSolver2()", "AdjointDPM()"),
    ("SDEDPMSolver1()", "RecordedAdjoint()"),
    ("ReversibleHeun()", "ReversibleAdjoint()"),
    ("AsyncLeapfrog()", "ReversibleAdjoint()"),
    ("BELM()", "ReversibleAdjoint()"),
    ("McCallumFoster(DPMSolver2())", "ReversibleAdjoint()"),
)


def overview_pairs() -> list:
    """The (sampler, adjoint) pairs of `OVERVIEW`, the default of `adjoint-jax
    compare`, in sampler-major order (as `compare` measures them)."""
    from ._registry import parse

    pairs = [(parse(s, "sampler"), parse(a, "adjoint")) for s, a in OVERVIEW]
    order = list(dict.fromkeys(repr(s) for s, _ in pairs))
    return sorted(pairs, key=lambda p: order.index(repr(p[0])))


def default_samplers() -> list:
    """Every public sampler of `aj` at its default settings (`McCallumFoster` around
    `DPMSolver2()`); new samplers enrol automatically."""
    names = _public_names(aj.AbstractSampler, _PREFERRED_SAMPLERS)
    return _dedupe([s for n in names for s in _variants("sampler", n)])


def default_adjoints() -> list:
    """Every public adjoint of `aj` at its default settings, plus `DTO` with
    checkpointing and the second-order continuous adjoints."""
    names = _public_names(aj.AbstractAdjoint, _PREFERRED_ADJOINTS)
    return _dedupe([a for n in names for a in _variants("adjoint", n)])


def valid_pairs(samplers=None, adjoints=None, *, strict: bool = False) -> list:
    """The (sampler, adjoint) pairs that the library accepts, in sampler-major order.

    With `strict=True` every sampler and every adjoint given must be in at least one
    valid pair; otherwise a `ValueError` explains why (the adjoint's own message)."""
    samplers = default_samplers() if samplers is None else list(samplers)
    adjoints = default_adjoints() if adjoints is None else list(adjoints)
    pairs, reasons = [], {}
    for s in samplers:
        for a in adjoints:
            try:
                a.check_sampler(s)
            except ValueError as e:
                reasons.setdefault(repr(s), str(e))
                reasons.setdefault(repr(a), str(e))
                continue
            pairs.append((s, a))
    if strict:
        used = {repr(o) for p in pairs for o in p}
        for o in list(samplers) + list(adjoints):
            if repr(o) not in used:
                raise ValueError(f"invalid pair: {reasons[repr(o)]}")
    if not pairs:
        raise ValueError("no valid (sampler, adjoint) pair to measure")
    return pairs


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


def _error_points(steps: Sequence[int], errs: Sequence[float]) -> list[tuple]:
    """The (N, error) pairs whose error is finite and positive, sorted by N."""
    return sorted(
        (n, e) for n, e in zip(steps, errs) if e is not None and e > 0 and math.isfinite(e)
    )


def fit_slope(steps: Sequence[int], errs: Sequence[float]) -> float:
    """Least-squares slope of log(error) against log(1/N) over the finite positive
    errors: the observed order of convergence (NaN with fewer than two points)."""
    pts = _error_points(steps, errs)
    if len(set(n for n, _ in pts)) < 2:
        return math.nan
    ns = np.asarray([p[0] for p in pts], float)
    es = np.asarray([p[1] for p in pts], float)
    return float(np.polyfit(-np.log(ns), np.log(es), 1)[0])


# The fitted slope is an order only where the local slopes (between consecutive N)
# agree to within this; otherwise the errors are pre-asymptotic (or at round-off).
SLOPE_SPREAD = 0.3


def local_slopes(steps: Sequence[int], errs: Sequence[float]) -> list[float]:
    """The slopes of log(error) against log(1/N) between consecutive N (sorted by N),
    over the finite positive errors."""
    pts = _error_points(steps, errs)
    return [
        math.log(e0 / e1) / math.log(n1 / n0)
        for (n0, e0), (n1, e1) in zip(pts, pts[1:])
        if n1 != n0
    ]


def is_asymptotic(steps: Sequence[int], errs: Sequence[float]) -> bool:
    """Whether a fitted slope over these errors reads as an order of convergence: at
    least three N, and local slopes that differ by at most `SLOPE_SPREAD`."""
    ls = local_slopes(steps, errs)
    return len(ls) >= 2 and max(ls) - min(ls) <= SLOPE_SPREAD


def add_slopes(records: list[dict]) -> list[dict]:
    """Sets `slope` and `slope_discrete` on every record: the fitted order of its
    (problem, sampler, adjoint, wrt) series over all N measured; and `asymptotic`:
    whether that fit (against the continuous truth where there is one, else against
    DTO) is an order (`is_asymptotic`), not a pre-asymptotic one."""
    series: dict[tuple, list[dict]] = {}
    for r in records:
        series.setdefault(
            (r["problem"], r["sampler"], r["adjoint"], r["wrt"]), []
        ).append(r)
    for rs in series.values():
        ns = [r["steps"] for r in rs]
        errs = [r["rel_error"] for r in rs]
        s = fit_slope(ns, errs)
        sd = fit_slope(ns, [r["rel_error_discrete"] for r in rs])
        if not math.isfinite(s):
            errs = [r["rel_error_discrete"] for r in rs]
        asym = is_asymptotic(ns, errs)
        for r in rs:
            r["slope"], r["slope_discrete"], r["asymptotic"] = s, sd, asym
    return records


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

    **Returns:** a list of records (dicts with the keys `FIELDS`), one per sampler ×
    adjoint × N × input. Errors are NaN where no truth is known; `nfe_backward` is the
    number of model evaluations of the gradient minus that of the sampler alone,
    `vjp_backward` the number of model VJPs; `ratio` is gradient time / sampling
    time; `temp_bytes` is XLA's compiled temporary memory of the jitted gradient.
    """
    wrt = list(wrt)
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
        pairs = valid_pairs(samplers, adjoints)
    else:
        pairs = list(pairs)
        for s, a in pairs:
            a.check_sampler(s)
    argnums_all = (0, 1, 2) if problem.cond is not None else (0, 1)
    args = (problem.params, problem.x_T, problem.cond)
    counter = _Counter(problem.model)
    dtype = str(jtu.tree_leaves(problem.x_T)[0].dtype)
    batch = (
        int(jtu.tree_leaves(problem.x_T)[0].shape[0])
        if jnp.ndim(jtu.tree_leaves(problem.x_T)[0]) > 1
        else 1
    )
    truth_cache: dict[bool, Any] = {}

    def pad(g):
        return tuple(g) + (None,) * (3 - len(g))

    def truth_of(sampler):
        if sampler.is_sde not in truth_cache:
            fn = problem.truth_for(sampler)
            truth_cache[sampler.is_sde] = None if fn is None else pad(fn(*args))
        return truth_cache[sampler.is_sde]

    by_sampler: dict[str, list] = {}
    samplers_in_order = []
    for s, a in pairs:
        if repr(s) not in by_sampler:
            by_sampler[repr(s)] = []
            samplers_in_order.append(s)
        by_sampler[repr(s)].append(a)

    records = []
    for sampler in samplers_in_order:
        loss = problem.loss_for(sampler)
        truth = truth_of(sampler)
        for n in steps:
            ts = problem.ts(n)
            key = problem.key if sampler.is_sde else None

            def sample_with(model, adjoint):
                def f(p, x, c):
                    return aj.sample(
                        model,
                        p,
                        x,
                        c,
                        schedule=problem.schedule,
                        ts=ts,
                        sampler=sampler,
                        adjoint=adjoint,
                        key=key,
                    )

                return f

            def loss_with(model, adjoint):
                f = sample_with(model, adjoint)
                return lambda p, x, c: loss(f(p, x, c))

            # The sampler alone: its model evaluations and its wall time.
            counter.reset()
            _run_once(sample_with(counter.model, aj.DTO()), args)
            nfe_forward = counter.evals
            sample_c, _, _ = _compile(sample_with(problem.model, aj.DTO()), args)
            sample_time = _median_time(sample_c, args, repeats, min_time)

            def counted_grads(adjoint):
                counter.reset()
                g = _run_once(
                    jax.grad(loss_with(counter.model, adjoint), argnums_all), args
                )
                return pad(g), counter.evals, counter.vjps

            discrete = None
            for adjoint in by_sampler[repr(sampler)]:
                if progress is not None:
                    progress(f"{sampler!r} {adjoint!r} N={n}")
                grads, evals, vjps = counted_grads(adjoint)
                if discrete is None:
                    discrete = (
                        grads if adjoint == aj.DTO() else counted_grads(aj.DTO())[0]
                    )
                for w in wrt:
                    argnums = argnums_all if w == "all" else _ARGNUM[w]
                    fn = jax.grad(loss_with(problem.model, adjoint), argnums)
                    compiled, compile_time, temp = _compile(fn, args)
                    grad_time = _median_time(compiled, args, repeats, min_time)
                    rel, cos = errors(_pick(grads, w), _pick(truth, w))
                    rel_d, cos_d = errors(_pick(grads, w), _pick(discrete, w))
                    records.append(
                        dict(
                            problem=problem.name,
                            sampler=repr(sampler),
                            adjoint=repr(adjoint),
                            steps=n,
                            wrt=w,
                            rel_error=rel,
                            cosine=cos,
                            rel_error_discrete=rel_d,
                            cosine_discrete=cos_d,
                            slope=math.nan,
                            slope_discrete=math.nan,
                            asymptotic=False,
                            nfe_forward=nfe_forward,
                            nfe_backward=evals - nfe_forward,
                            vjp_backward=vjps,
                            grad_time_s=grad_time,
                            sample_time_s=sample_time,
                            ratio=grad_time / sample_time,
                            temp_bytes=temp,
                            compile_time_s=compile_time,
                            dtype=dtype,
                            batch=batch,
                        )
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
