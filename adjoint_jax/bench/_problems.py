"""Benchmark problems with known truth, shared by the tests and `adjoint-jax compare`.

- `GaussianProblem`: data N(μ + c, diag(s²)); the exact ε, the exact probability-flow
  map x_T ↦ x_{t_end}, and so exact gradients with respect to x_T, μ, s and the
  conditioning shift c, are closed form (see `flow_map`).
- `MLPProblem`: a random-weight MLP ε-network (nonlinear in x, t, z and θ) with no
  closed-form truth; used against finite differences and `DTO`.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array

from .._schedule import AbstractSchedule, VPLinear


class GaussianProblem(eqx.Module):
    """Data x_0 ~ N(μ + c, diag(s²)) in `dim` dimensions under a VP schedule.

    With v_t = α_t² s² + σ_t² the marginal variance, the exact ε-model is

        ε(x, t, c) = σ_t (x − α_t (μ + c)) / v_t,

    the probability-flow ODE is linear and its flow map from T to t is

        x_t = α_t m + √(v_t / v_T) (x_T − α_T m),    m = μ + c.

    For the reverse SDE the state stays affine in x_T with the deterministic Jacobian
    ∂x_t/∂x_T = (α_T/α_t)(v_t/v_T) and ∂x_t/∂m = α_t − (α_T/α_t)(v_t/v_T) α_T, so a
    linear loss has a noise-independent exact gradient (`sde_linear_grads`).

    `params` is `{"mu": μ, "s": s}`; `cond` is the shift c (shape `(dim,)`) or None.
    Avoid s = 1 under a VP schedule: the flow map becomes a shift and every Jacobian
    the identity.
    """

    schedule: AbstractSchedule
    mu: Array
    s: Array

    @staticmethod
    def make(dim: int = 4, schedule: AbstractSchedule | None = None, dtype=None):
        """A deterministic problem in `dim` dimensions: standard deviations spread
        over [0.2, 2] (avoiding 1), means μ_k = sin(1 + 2k); `schedule` defaults to
        `aj.VPLinear()` and `dtype` to JAX's default float."""
        dtype = dtype or jnp.result_type(float)
        schedule = schedule or VPLinear()
        # Standard deviations spread over [0.2, 2], avoiding 1.
        s = jnp.asarray([0.2 + 1.8 * (k + 0.5) / dim for k in range(dim)], dtype)
        s = jnp.where(jnp.abs(s - 1.0) < 0.05, s + 0.1, s)
        mu = jnp.asarray([math.sin(1.0 + 2.0 * k) for k in range(dim)], dtype)
        return GaussianProblem(schedule, mu, s)

    @property
    def params(self) -> dict:
        return {"mu": self.mu, "s": self.s}

    def model(self, params, x, t, cond):
        """The exact ε-model above, `model(params, x, t, cond) -> ε`, for
        `aj.sample`."""
        sch = self.schedule
        a, sg = sch.alpha(t).astype(x.dtype), sch.sigma(t).astype(x.dtype)
        m = params["mu"] if cond is None else params["mu"] + cond
        v = a * a * params["s"] ** 2 + sg * sg
        return sg * (x - a * m) / v

    def _v(self, t, s):
        return self.schedule.alpha(t) ** 2 * s**2 + self.schedule.sigma(t) ** 2

    def flow_map(self, params, x_T, cond, t_start, t_end):
        """The exact probability-flow ODE solution at `t_end` from `x_T` at `t_start`."""
        sch = self.schedule
        m = params["mu"] if cond is None else params["mu"] + cond
        a_T, a_e = sch.alpha(t_start), sch.alpha(t_end)
        ratio = jnp.sqrt(self._v(t_end, params["s"]) / self._v(t_start, params["s"]))
        return a_e * m + ratio * (x_T - a_T * m)

    def sde_linear_grads(self, w, params, cond, t_start, t_end):
        """Exact gradients of L = Σ w·x_{t_end} through the reverse SDE with respect to
        x_T and μ (equal to that with respect to c); noise independent."""
        del cond
        sch = self.schedule
        a_T, a_e = sch.alpha(t_start), sch.alpha(t_end)
        jac = (a_T / a_e) * self._v(t_end, params["s"]) / self._v(t_start, params["s"])
        return {"x_T": w * jac, "mu": w * (a_e - jac * a_T)}


def _broadcast_rows(a, x, k: int):
    """`a` (trailing size k) broadcast to x's leading axes. Under explicit mesh axes
    (`jax.sharding.AxisType.Explicit`) it takes x's sharding of those axes, so that
    concatenating it with x is well defined; otherwise it is a plain broadcast."""
    shape = x.shape[:-1] + (k,)
    sharding = jax.typeof(x).sharding
    if not sharding.mesh.explicit_axes:
        return jnp.broadcast_to(a, shape)
    spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    return jnp.broadcast_to(a, shape, out_sharding=P(*spec[:-1], None))


class MLPProblem(eqx.Module):
    """A random-weight MLP ε-network, nonlinear in every input and batch-aware (x of
    shape `(..., dim)`):

        ε(x, t, z) = σ_t x / (α_t² s₀² + σ_t²) + W₃ tanh(W₂ tanh(W₁[x, z, emb(t)])),

    i.e. the exact ε of N(0, s₀² I) data (s₀ = 0.5) plus a random MLP. The first term
    keeps samples bounded, as a trained network's would; a bare random MLP would
    amplify x_T by 1/α_T (≈ 150 on VP-linear) and make every figure meaningless.
    """

    schedule: AbstractSchedule
    params: dict
    dim: int = eqx.field(static=True)
    cond_dim: int = eqx.field(static=True)

    @staticmethod
    def make(
        key,
        dim: int = 4,
        width: int = 32,
        cond_dim: int = 2,
        schedule: AbstractSchedule | None = None,
        scale: float = 1.0,
        dtype=None,
    ):
        """Random weights from `key`: a `width`-wide MLP of `dim` state, `cond_dim`
        conditioning and 4 time features, its first two layers' weights scaled by
        `scale`; `schedule` defaults to `aj.VPLinear()` and `dtype` to JAX's default
        float."""
        dtype = dtype or jnp.result_type(float)
        k1, k2, k3 = jax.random.split(key, 3)
        fan_in = dim + cond_dim + 4
        params = {
            "w1": jax.random.normal(k1, (fan_in, width), dtype) * scale / math.sqrt(fan_in),
            "b1": jnp.zeros((width,), dtype),
            "w2": jax.random.normal(k2, (width, width), dtype) * scale / math.sqrt(width),
            "b2": jnp.zeros((width,), dtype),
            "w3": jax.random.normal(k3, (width, dim), dtype) / math.sqrt(width),
        }
        return MLPProblem(schedule or VPLinear(), params, dim, cond_dim)

    def model(self, params, x, t, cond):
        """The ε-network above, `model(params, x, t, cond) -> ε`, for `aj.sample`
        (`cond=None`: zero conditioning)."""
        emb = jnp.stack([jnp.sin(t), jnp.cos(t), jnp.sin(3.0 * t), jnp.cos(3.0 * t)])
        lead = x.shape[:-1]
        z = jnp.zeros((self.cond_dim,), x.dtype) if cond is None else cond
        z = _broadcast_rows(z, x, self.cond_dim)
        emb = _broadcast_rows(emb.astype(x.dtype), x, 4)
        h = jnp.concatenate([x, z, emb], axis=-1)
        bias = lambda b: b.reshape((1,) * len(lead) + b.shape)
        h = jnp.tanh(h @ params["w1"] + bias(params["b1"]))
        h = jnp.tanh(h @ params["w2"] + bias(params["b2"]))
        a = self.schedule.alpha(t).astype(x.dtype)
        sg = self.schedule.sigma(t).astype(x.dtype)
        return sg * x / (0.25 * a * a + sg * sg) + h @ params["w3"]
