"""`EDMDPMSolverMultistepScheduler` (Playground v2.5) and `EDMEulerScheduler`: the
variance-exploding schedulers of Karras et al. (2022) with σ_data preconditioning,
on `aj.VarianceExploding(sigma_min, sigma_max)` (t = σ, α = 1/√(1 + σ²)).

The pipeline keeps the VE latents y = x/α: x_T = α(σ_0) · √(σ_max² + 1) · z
(`init_noise_sigma` uses the config's σ_max, the grid may start elsewhere), and the
result is x/α at the last σ (1 at σ = 0). The network is called as the pipeline
calls it: F(c_in y, c_noise) with c_in = 1/√(σ² + σ_d²), c_noise = ¼ log σ, and its
output preconditioned to x̂_0 = c_skip y + c_out F, c_skip = σ_d²/(σ² + σ_d²),
c_out = ±σ σ_d/√(σ² + σ_d²) (ε / v-prediction).

- `EDMDPMSolverMultistepScheduler`: its VE DPM-Solver++ (α = 1, σ = σ, λ = −log σ)
  is `aj.DPMSolverPP` / `aj.SDEDPMSolverPP` on the same λ (the data-prediction
  update is the same in VE and VP coordinates): `solver_order`, `solver_type`,
  `lower_order_final`, `euler_at_final`, `thresholding`, `final_sigmas_type` and the
  Karras (`rho`) or exponential `sigma_schedule` are reproduced.
- `EDMEulerScheduler`: `step`'s Euler step y_s = y + (σ_s − σ)(y − x̂_0)/σ is
  `aj.DPMSolver1()`; its `set_timesteps(sigmas=)` takes the *ramp* (the positions in
  [0, 1] fed to the Karras formula; only its length for the exponential schedule),
  as diffusers does; `final_sigmas_type="sigma_min"` repeats the last σ (an
  identity step, dropped). `step`'s `s_churn` (stochastic churn) is not an argument
  of `from_diffusers`: its default 0 is reproduced.
"""

import math

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._model import AbstractPredictor
from .._samplers._dpm_solver import DPMSolver1
from .._samplers._dpm_solver_pp import DPMSolverPP, multistep_orders
from .._samplers._sde_dpm_solver_pp import SDEDPMSolverPP
from .._schedule import VarianceExploding
from ._config import Keys
from ._family import Family, Plan, refuse_args


_DPM, _EULER = "EDMDPMSolverMultistepScheduler", "EDMEulerScheduler"
_COMMON = {
    "sigma_schedule": (("karras", "exponential"), "is not a σ schedule diffusers has"),
    "prediction_type": (("epsilon", "v_prediction"),
                        "has no EDM preconditioning in diffusers (it raises)"),
    "final_sigmas_type": (("zero", "sigma_min"), "is not a final sigma diffusers has"),
}
_KNOWN = frozenset(
    {"sigma_min", "sigma_max", "sigma_data", "rho", "num_train_timesteps"}
)
_DPM_REFUSED = _COMMON | {
    "algorithm_type": (("dpmsolver++", "sde-dpmsolver++", "deis"),
                       "is not an algorithm diffusers' EDM solver has"),
    "solver_type": (("midpoint", "heun", "logrho", "bh1", "bh2"),
                    "is not a solver type diffusers has"),
    "solver_order": ((1, 2, 3), "is not an order diffusers documents"),
}
_DPM_KNOWN = _KNOWN | {
    "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
    "lower_order_final", "euler_at_final",
}


def _refuse(name, key, value, why) -> ValueError:
    return ValueError(
        f"`config[{key!r}] = {value!r}` ({name}) is not supported: it {why}."
    )


def _range(config) -> tuple[float, float]:
    return float(config.get("sigma_min", 0.002)), float(config.get("sigma_max", 80.0))


def edm_sigmas(config, ramp: np.ndarray) -> np.ndarray:
    """`_compute_karras_sigmas(ramp)` (ρ from the config) or
    `_compute_exponential_sigmas(ramp)` (log-uniform from σ_max to σ_min in
    len(ramp) points), in float64."""
    lo, hi = _range(config)
    if config.get("sigma_schedule", "karras") == "karras":
        rho = float(config.get("rho", 7.0))
        inv_lo, inv_hi = lo ** (1 / rho), hi ** (1 / rho)
        return (inv_hi + ramp * (inv_lo - inv_hi)) ** rho
    return np.exp(np.linspace(math.log(lo), math.log(hi), len(ramp)))[::-1].copy()


class EDMNetwork(AbstractPredictor):
    """The EDM-preconditioned network on `aj.VarianceExploding` (t = σ): F is called
    with c_in y (y = x/α_t) and c_noise = ¼ log σ; x̂_0 = c_skip y + c_out F and
    ε = (y − x̂_0)/σ (= (x − α x̂_0)/σ_t)."""

    model: object
    schedule: VarianceExploding
    sigma_data: float = eqx.field(static=True)
    sign: float = eqx.field(static=True)  # +1: ε-prediction; −1: v-prediction

    def predict(self, params, x, t, cond):
        sd2 = self.sigma_data**2
        alpha = self.schedule.alpha(t)
        y = jtu.tree_map(lambda v: v / alpha.astype(v.dtype), x)
        norm = jnp.sqrt(t * t + sd2)
        c_in, c_skip = 1.0 / norm, sd2 / (t * t + sd2)
        c_out = self.sign * t * self.sigma_data / norm
        scaled = jtu.tree_map(lambda v: v * c_in.astype(v.dtype), y)
        out = self.model(params, scaled, 0.25 * jnp.log(t), cond)
        out = jtu.tree_map(lambda o, v: o.astype(v.dtype), out, x)

        def both(yy, o):
            x0 = c_skip.astype(yy.dtype) * yy + c_out.astype(yy.dtype) * o
            return (yy - x0) / t.astype(yy.dtype), x0

        pairs = jtu.tree_map(both, y, out)
        is_pair = lambda p: isinstance(p, tuple)
        return (jtu.tree_map(lambda p: p[0], pairs, is_leaf=is_pair),
                jtu.tree_map(lambda p: p[1], pairs, is_leaf=is_pair))


class EDMFamily(Family):
    """Both EDM schedulers; an instance bound to a plan (`t_range`: a grid beyond the
    config's [σ_min, σ_max], from pipeline-passed ramps) builds its schedule."""

    keys = {
        _DPM: Keys(_DPM_REFUSED, {}, _DPM_KNOWN),
        _EULER: Keys(_COMMON, {}, _KNOWN),
    }

    def __init__(self, t_range=None):
        self.t_range = t_range

    def schedule(self, config, name):
        lo, hi = _range(config) if self.t_range is None else self.t_range
        return VarianceExploding(lo, hi)

    def network(self, model, config, name):
        sign = 1.0 if config.get("prediction_type", "epsilon") == "epsilon" else -1.0
        return EDMNetwork(model, self.schedule(config, name),
                          float(config.get("sigma_data", 0.5)), sign)

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, timesteps=timesteps, mu=mu)
        if eta:
            raise ValueError(
                f"`eta` is DDIM's; {name}.step takes none (got eta={eta!r})."
            )
        if name == _DPM:
            refuse_args(name, sigmas=sigmas)
        ramp = np.linspace(0, 1, num_steps) if sigmas is None else sigmas
        if ramp.ndim != 1 or len(ramp) < 1:
            raise ValueError(
                f"`sigmas` (the ramp) must be a non-empty 1-D array; got {ramp}."
            )
        sig = edm_sigmas(config, ramp)
        lo, hi = _range(config)
        zero = config.get("final_sigmas_type", "zero") == "zero"
        last = 0.0 if zero else (lo if name == _DPM else float(sig[-1]))
        full = self._orders(config, len(sig))
        drop = not zero and abs(sig[-1] - last) <= 1e-12 * last
        if drop:  # σ_min → σ_min: the identity, dropped
            if name == _DPM:
                self._check_identity(config, full, sig[-1] == last)
            ts = sig
        else:
            ts = np.concatenate([sig, [last]])
        if len(ts) < 2 or not np.all(np.diff(ts) < 0) or ts[-1] < 0:
            raise ValueError(
                f"{name}: the σ of the steps must decrease strictly to the final "
                f"σ = {last}; got {np.append(sig, last).tolist()}."
            )
        sampler = DPMSolver1() if name == _EULER else self._sampler(config, full, drop)
        ts = self._snap(ts, lo, hi)
        init = math.sqrt(hi**2 + 1) / math.sqrt(ts[0] ** 2 + 1)
        plan = Plan(ts, sampler, init, math.sqrt(ts[-1] ** 2 + 1))
        inner = ts[ts > 0]
        if inner.min() < lo or inner.max() > hi:
            wide = float(min(lo, inner.min())), float(max(hi, inner.max()))
            plan = plan._replace(family=EDMFamily(wide))
        return plan

    @staticmethod
    def _check_identity(config, orders, exact) -> None:
        """The dropped step σ_min → σ_min: exactly h = 0 divides 0 by h at order 3
        or heun's 2 (NaN in diffusers); a round-off h adds SDE noise σ √(2h) ξ."""
        sde = config.get("algorithm_type", "dpmsolver++") == "sde-dpmsolver++"
        if not exact and sde:
            raise _refuse(_DPM, "final_sigmas_type", "sigma_min", "ends this grid with "
                          "a step from σ_min up to round-off to σ_min, over which "
                          "sde-dpmsolver++ adds noise σ √(2h) ξ (~1e-10 for h ~ 1e-16 "
                          "of round-off) that cannot be reproduced")
        heun = config.get("solver_type", "midpoint") == "heun"
        if exact and (orders[-1] == 3 or (orders[-1] == 2 and heun)):
            raise _refuse(_DPM, "final_sigmas_type", "sigma_min", "ends this grid with "
                          f"a step σ_min → σ_min of order {orders[-1]}, where "
                          "diffusers' update divides 0 by h = 0 (NaN)")

    @staticmethod
    def _snap(ts, lo, hi):
        """The grid's ends on the range's bounds where they miss them by round-off
        (Karras' (σ^(1/ρ))^ρ)."""
        ts = ts.copy()
        for bound in (lo, hi):
            ts[np.abs(ts - bound) <= 1e-12 * bound] = bound
        return ts

    @staticmethod
    def _orders(config, n):
        return multistep_orders(int(config.get("solver_order", 2)), n,
                                bool(config.get("lower_order_final", True)),
                                bool(config.get("euler_at_final", False)))

    @staticmethod
    def _sampler(config, orders, drop):
        """The sampler; `orders`: diffusers' order of every step (the last dropped
        with `drop`)."""
        solver_type = config.get("solver_type", "midpoint")
        if solver_type in ("logrho", "bh1", "bh2"):
            solver_type = "midpoint"
        thr = None
        if config.get("thresholding", False):
            thr = (float(config.get("dynamic_thresholding_ratio", 0.995)),
                   float(config.get("sample_max_value", 1.0)))
        kw = dict(order=int(config.get("solver_order", 2)), solver_type=solver_type,
                  lower_order_final=bool(config.get("lower_order_final", True)),
                  euler_at_final=bool(config.get("euler_at_final", False)),
                  orders=tuple(int(k) for k in orders[:-1]) if drop else None,
                  thresholding=thr)
        if config.get("algorithm_type", "dpmsolver++") == "sde-dpmsolver++":
            if 3 in orders:
                raise _refuse(_DPM, "solver_order", 3, "has third-order steps for "
                              "sde-dpmsolver++, which diffusers' EDM solver does not "
                              "implement (its step fails)")
            return SDEDPMSolverPP(**kw)
        return DPMSolverPP(**kw)


FAMILY = EDMFamily()
