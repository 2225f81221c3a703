"""A Gaussian-mixture data model with sharp components: analytic, nonlinear ε, and a
converged diffrax solve as the truth."""

import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._schedule import AbstractSchedule, VPLinear


class MixtureProblem(eqx.Module):
    """Data x_0 ~ Σ_k w_k N(μ_k + c, s_k² I) in `dim` dimensions under a VP schedule:
    a few isotropic components with small standard deviations (0.02–0.06 in data
    units), like image data concentrated near a low-dimensional set.

    With v_k(t) = α_t² s_k² + σ_t² and the posterior responsibilities
    r_k(x, t) = softmax_k(log w_k − ½ dim·log v_k − |x − α_t m_k|²/(2 v_k)),
    m_k = μ_k + c, the exact ε-model is

        ε(x, t, c) = σ_t Σ_k r_k (x − α_t m_k) / v_k,

    nonlinear in x, t, c and every parameter. Sharp components make the ODE stiff in
    t near the data and the responsibilities switch quickly where the components
    separate (ρ = σ/α of the order of the distances between means): this is what
    separates the samplers and the adjoints, unlike a broad mixture.

    `params` is `{"means": (K, dim), "stds": (K,), "logits": (K,)}`; `cond` is the
    shift c of all means (shape `(dim,)`) or None. `model` is batch-aware
    (x of shape `(..., dim)`). There is no closed-form flow map; `reference` gives a
    converged diffrax solve (relative accuracy about 1e-10 in float64).
    """

    schedule: AbstractSchedule
    means: Array
    stds: Array
    logits: Array

    @staticmethod
    def make(
        dim: int = 2,
        num_components: int = 4,
        schedule: AbstractSchedule | None = None,
        std_range: tuple[float, float] = (0.02, 0.06),
        dtype=None,
    ):
        """A deterministic mixture: `num_components` means of norm about 1 (on a circle
        in the first two coordinates, sinusoidal in the others), standard deviations
        spread over `std_range`, slightly unequal weights."""
        dtype = dtype or jnp.result_type(float)
        schedule = schedule or VPLinear()
        k_ = num_components
        means = []
        for k in range(k_):
            angle = 2.0 * math.pi * k / k_ + 0.3
            row = [math.cos(angle), math.sin(angle)]
            row += [0.5 * math.sin(1.0 + 2.0 * k + 3.0 * j) for j in range(2, dim)]
            means.append(row[:dim])
        lo, hi = std_range
        stds = [lo + (hi - lo) * k / max(k_ - 1, 1) for k in range(k_)]
        logits = [0.3 * math.cos(1.0 + k) for k in range(k_)]
        return MixtureProblem(
            schedule,
            jnp.asarray(means, dtype),
            jnp.asarray(stds, dtype),
            jnp.asarray(logits, dtype),
        )

    @property
    def params(self) -> dict:
        return {"means": self.means, "stds": self.stds, "logits": self.logits}

    def model(self, params, x, t, cond):
        """The exact ε-model above, `model(params, x, t, cond) -> ε`, for
        `aj.sample`."""
        sch = self.schedule
        a, sg = sch.alpha(t).astype(x.dtype), sch.sigma(t).astype(x.dtype)
        m = params["means"] if cond is None else params["means"] + cond[None, :]
        lead = x.shape[:-1]
        dim = x.shape[-1]
        ones = (1,) * len(lead)
        v = (a * a) * params["stds"] ** 2 + sg * sg  # (K,)
        diff = x[..., None, :] - (a * m).reshape(ones + m.shape)  # (..., K, dim)
        v_b = v.reshape(ones + v.shape)
        logp = (
            jax.nn.log_softmax(params["logits"]).reshape(ones + v.shape)
            - 0.5 * dim * jnp.log(v_b)
            - 0.5 * jnp.sum(diff * diff, axis=-1) / v_b
        )
        r = jax.nn.softmax(logp, axis=-1)  # (..., K)
        return sg * jnp.sum((r / v_b)[..., None] * diff, axis=-2)

    def reference(
        self,
        params,
        x_T: Array,
        cond,
        t_start,
        t_end,
        *,
        rtol: float = 1e-10,
        atol: float = 1e-10,
        max_steps: int = 100_000,
    ) -> Array:
        """The probability-flow ODE solution at `t_end` from `x_T` at `t_start`, by a
        converged adaptive solve (diffrax `Dopri8`, PID step-size control) of
        dy/dρ = ε(α y, t(ρ)) in y = x/α against ρ = σ/α. Differentiable (diffrax's
        checkpointed adjoint), so `jax.grad` of a loss of it is the reference
        gradient."""
        return reference_flow(
            self.model, self.schedule, params, x_T, cond, t_start, t_end,
            rtol=rtol, atol=atol, max_steps=max_steps,
        )


def reference_flow(
    model,
    schedule: AbstractSchedule,
    params,
    x_T: Array,
    cond,
    t_start,
    t_end,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    max_steps: int = 100_000,
) -> Array:
    """The probability-flow ODE solution of any ε-model `model(params, x, t, cond)` at
    `t_end` from `x_T` at `t_start`: a converged adaptive solve (diffrax `Dopri8`, PID
    step-size control) of dy/dρ = ε(α y, t(ρ)) in y = x/α against ρ = σ/α.
    Differentiable (diffrax's checkpointed adjoint): `jax.grad` of a loss of it is a
    reference gradient."""
    sch = schedule
    dtype = x_T.dtype
    t_start = jnp.asarray(t_start, dtype)
    t_end = jnp.asarray(t_end, dtype)

    def vf(rho, y, args):
        params_, cond_ = args
        t = sch.t_of_lam(-jnp.log(rho))
        return model(params_, jnp.exp(sch.log_alpha(t)).astype(dtype) * y, t, cond_)

    y0 = x_T / jnp.exp(sch.log_alpha(t_start)).astype(dtype)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        diffrax.Dopri8(),
        t0=jnp.exp(-sch.lam(t_start)),
        t1=jnp.exp(-sch.lam(t_end)),
        dt0=None,
        y0=y0,
        args=(params, cond),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
    )
    return jnp.exp(sch.log_alpha(t_end)).astype(dtype) * sol.ys[0]
