"""The benchmark problems of `adjoint-jax compare`: `Problem` (a model, its inputs, a
loss and optionally the continuous-time truth of the gradient) and the built-in ones,
`make_problem("gaussian" | "mixture" | "mlp" | "digits")`."""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

import adjoint_jax as aj


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


def _truth_through(flow, loss64):
    """`truth(params, x_T, cond)`: the float64 gradient of `loss64(flow(p, x, c))`,
    `flow` a converged reference solve of the probability-flow map."""

    def truth(params, x_T, cond):
        f = lambda p, x, c: loss64(flow(p, x, c))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*_f64((params, x_T, cond)))

    return truth


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

    truth = _truth_through(lambda p, x, c: pb64.reference(p, x, c, t0, t_end), loss64)

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

    truth = _truth_through(
        lambda p, x, c: reference_flow(pb.model, pb.schedule, p, x, c, t0, t_end), loss64
    )

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
