"""`DPMSolverMultistepScheduler` in full: the sampler of `algorithm_type`
(`aj.DPMSolverPP`, `aj.SDEDPMSolverPP`, `aj.DPMSolver`, `aj.DPMSolver(sde=True)`;
"deis" is dpmsolver++, as diffusers registers it) with `solver_order`,
`solver_type`, `lower_order_final`, `euler_at_final` and `thresholding`, on the grid
of `set_timesteps(num_steps, timesteps=, mu=)`:

- integer timesteps (`timestep_spacing`, `steps_offset`, `lambda_min_clipped`, or the
  pipeline's `timesteps`): t = (n + 1)/T on `aj.VPDiscrete`, the network gets n;
- σ-grids (`use_karras_sigmas` — "DPM++ 2M Karras" —, `use_lu_lambdas`,
  `use_exponential_sigmas`, `use_beta_sigmas`): t of λ = −log σ on `aj.VPDiscrete`,
  the network gets diffusers' `_sigma_to_t` index, rounded for Karras/lu (unless
  `beta_schedule="squaredcos_cap_v2"`) and truncated otherwise (its int64 cast);
- flow sigmas (`use_flow_sigmas`, `flow_shift`, or e^mu with `use_dynamic_shifting`:
  Sana, Wan): t = σ on `aj.FlowMatching()`, the network gets int(T σ);

ending at σ = 0 or at σ_min (`final_sigmas_type`; the training table's σ_0 even for
flow sigmas, as diffusers does). A last step σ_min → σ_min (the σ-grids end on
σ_min) is the identity and is dropped, the sampler keeping diffusers' order schedule
of all steps. `rescale_betas_zero_snr` is the table with ᾱ_{T−1} = 2⁻²⁴ (diffusers'
override), reproduced where it keeps ᾱ decreasing.

Each grid binds its exact timesteps (a `TimestepMap("table")` on the grid's times,
computed in float64 NumPy whatever the model's dtype); `aj.diffusers_model` without a
grid maps the noise level instead. On ties (a σ exactly a training σ, as a ramp's
first point) the truncated index is the exact-arithmetic one: 999 at σ_max, which
float64 diffusers also gives, while diffusers' float32 table gives 998 for the
exponential/beta grids of scaled-linear or cosine betas.
"""

import math

import numpy as np

from .._samplers._dpm_solver_multistep import DPMSolver
from .._samplers._dpm_solver_pp import DPMSolverPP, multistep_orders
from .._samplers._sde_dpm_solver_pp import SDEDPMSolverPP
from .._schedule import FlowMatching, VPDiscrete
from ._config import Keys
from ._dpm_tables import (
    Converted,
    diffusers_index,
    quantise,
    spacing_timesteps,
    train_table,
)
from ._family import Family, Plan, refuse_args
from ._grids import beta, exponential, flow_shift, karras, lu_lambdas, vp_times
from ._net import Network, TimestepMap, network


_NAME = "DPMSolverMultistepScheduler"
_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver", "deis")
_REFUSED = {
    "variance_type": (
        (None,),
        "makes the network's output carry a learned variance, of which diffusers keeps "
        "channels [:3] of axis 1 as ε whatever the latents' channels: pass "
        "from_diffusers the network's ε channels and drop the key",
    ),
    "algorithm_type": (_ALGORITHMS, "is not an algorithm diffusers has"),
    "solver_type": (("midpoint", "heun", "logrho", "bh1", "bh2"),
                    "is not a solver type diffusers has"),
    "solver_order": ((1, 2, 3), "is not an order diffusers documents"),
    "final_sigmas_type": (("zero", "sigma_min"), "is not a final sigma diffusers has"),
    "timestep_spacing": (("linspace", "leading", "trailing"),
                         "is not a spacing diffusers has"),
    "prediction_type": (("epsilon", "v_prediction", "sample", "flow_prediction"),
                        "is not a prediction type diffusers has"),
}
_KNOWN = frozenset({
    "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
    "lower_order_final", "euler_at_final", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
    "flow_shift",
    "lambda_min_clipped", "steps_offset", "use_dynamic_shifting", "time_shift_type",
})
# diffusers' precedence among the σ-grid options (the first one set wins).
_CONVERSIONS = ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas",
                "use_beta_sigmas")


def _refuse(key, value, why) -> ValueError:
    return ValueError(
        f"`config[{key!r}] = {value!r}` ({_NAME}) is not supported: it {why}."
    )


def _conversion(config) -> str | None:
    """The σ-grid option in effect, after diffusers' own checks."""
    on = [k for k in _CONVERSIONS if config.get(k, False)]
    exclusive = [k for k in on if k != "use_lu_lambdas"]
    if len(exclusive) > 1:
        raise _refuse(exclusive[1], True, f"is set with {exclusive[0]!r}, which "
                      "diffusers refuses (at most one of Karras, exponential, beta "
                      "sigmas)")
    if on and config.get("use_flow_sigmas", False):
        raise _refuse("use_flow_sigmas", True, f"is set with {on[0]!r}: diffusers then "
                      "steps a VP σ-grid but reads it as flow σ (α = 1 − σ)")
    return on[0] if on else None


def _algorithm(config) -> str:
    kind = config.get("algorithm_type", "dpmsolver++")
    return "dpmsolver++" if kind == "deis" else kind


def _flow_grid(config, n: int, mu) -> np.ndarray:
    """The flow σ of `use_flow_sigmas`: 1 − linspace(1, 1/T, n + 1), shifted by
    `flow_shift` (e^mu with `mu`), reversed, the 0 dropped."""
    T = int(config.get("num_train_timesteps", 1000))
    shift = float(config.get("flow_shift", 1.0)) if mu is None else np.exp(mu)
    sig = 1.0 - np.linspace(1, 1 / T, n + 1)
    return flow_shift(sig, shift)[::-1][:-1].copy()


def _check_mu(config, mu) -> None:
    if mu is None:
        return
    if not config.get("use_dynamic_shifting", False):
        raise _refuse("use_dynamic_shifting", config.get("use_dynamic_shifting", False),
                      "is off while the pipeline passes `mu` (diffusers asserts it is "
                      "on)")
    if config.get("time_shift_type", "exponential") != "exponential":
        raise _refuse("time_shift_type", config["time_shift_type"],
                      "is not 'exponential' while the pipeline passes `mu` (diffusers "
                      "asserts it, then uses flow_shift = e^mu)")


def _grid(config, n, timesteps, mu):
    """(σ of each step, the network's timestep there, grid kind: None for integer
    timesteps, "flow", or the σ-grid option) of `set_timesteps`."""
    T = int(config.get("num_train_timesteps", 1000))
    kind, flow = _conversion(config), bool(config.get("use_flow_sigmas", False))
    if timesteps is not None and (kind or flow):
        raise _refuse(kind or "use_flow_sigmas", True, "cannot take the pipeline's "
                      "`timesteps` (diffusers raises, or fails, for this combination)")
    table = train_table(config, _NAME)
    if flow:
        sig = _flow_grid(config, n, mu)
        return sig, np.floor(sig * T).astype(np.int64), "flow"  # int64 cast of T σ
    if kind is None:
        steps = (np.asarray(timesteps).astype(np.int64) if timesteps is not None
                 else spacing_timesteps(config, n, table))
        return table.sigmas[steps], steps, None
    hi, lo = table.sigmas[-1], table.sigmas[0]
    if kind == "use_karras_sigmas":
        sig = karras(hi, lo, n)
    elif kind == "use_lu_lambdas":
        sig = lu_lambdas(math.log(hi), math.log(lo), n)
    elif kind == "use_exponential_sigmas":
        sig = exponential(hi, lo, n)
    else:
        sig = beta(hi, lo, n)
    rounds = kind in ("use_karras_sigmas", "use_lu_lambdas") and (
        config.get("beta_schedule", "linear") != "squaredcos_cap_v2")
    tau = diffusers_index(sig, table.log_sigmas)
    steps = quantise(tau, "round" if rounds else "floor")
    return sig, steps, kind


def _times(sig, steps, kind, table, schedule) -> np.ndarray:
    """`aj` times of the steps: flow σ itself; timestep n on its knot (n + 1)/T; a
    σ-grid by λ = −log σ, its ends (σ_max, σ_min up to round-off) on their knots."""
    T = len(table.sigmas)
    if kind == "flow":
        return np.asarray(sig, np.float64)
    if kind is None:
        return (steps + 1.0) / T
    times = vp_times(schedule, sig)
    for k in (0, T - 1):
        times[np.abs(sig - table.sigmas[k]) <= 1e-12 * table.sigmas[k]] = (k + 1) / T
    return times


class DPMMultistepFamily(Family):
    """The family; an instance bound to a plan (`table`: the grid's times and the
    network's timesteps there; `t_range`: a flow grid beyond `aj.FlowMatching()`'s
    default range) builds that plan's network and schedule."""

    keys = {_NAME: Keys(_REFUSED, {}, _KNOWN)}

    def __init__(self, table=None, t_range=None):
        self.table, self.t_range = table, t_range

    def schedule(self, config, name):
        if config.get("use_flow_sigmas", False):
            if self.t_range is None:
                return FlowMatching()
            return FlowMatching(*self.t_range)
        return VPDiscrete(train_table(config, name).betas)

    def network(self, model, config, name):
        T = int(config.get("num_train_timesteps", 1000))
        flow = bool(config.get("use_flow_sigmas", False))
        if self.table is not None:
            tmap = TimestepMap("table", "round", xs=self.table[0], ys=self.table[1])
        elif flow:
            tmap = TimestepMap("flow", "floor", scale=float(T))
        elif _conversion(config) is None:
            tmap = TimestepMap("knots", "round", scale=float(T))
        else:
            rounds = _conversion(config) in _CONVERSIONS[:2] and (
                config.get("beta_schedule", "linear") != "squaredcos_cap_v2")
            tmap = TimestepMap("log-index", "round" if rounds else "floor",
                               xs=train_table(config, name).log_sigmas)
        kind = config.get("prediction_type", "epsilon")
        algorithm = _algorithm(config)
        if kind == "flow_prediction" and algorithm in ("dpmsolver", "sde-dpmsolver"):
            raise _refuse("prediction_type", kind, f"is not read by algorithm_type "
                          f"{algorithm!r} (diffusers raises)")
        schedule = self.schedule(config, name)
        primary = "x0" if algorithm.endswith("++") else "eps"
        own = "flow" if kind == "flow_prediction" else kind
        if (own == "v_prediction" and flow) or (own == "flow" and not flow):
            return Converted(Network(model, schedule, tmap), schedule,
                             "flow" if own == "flow" else "v", primary)
        return network(model, schedule, tmap, own)

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, sigmas=sigmas)
        if eta:
            raise ValueError(
                f"`eta` is DDIM's; {name}.step takes none (got eta={eta!r})."
            )
        _check_mu(config, mu)
        sig, steps, kind = _grid(config, num_steps, timesteps, mu)
        if np.sum(steps == steps[0]) > 1:
            raise ValueError(
                f"{name}: the first timestep {steps[0]} occurs twice in "
                f"{steps.tolist()}; diffusers' index_for_timestep then starts at its "
                "second occurrence and its loop runs past the last σ."
            )
        table = train_table(config, name)
        times = _times(sig, steps, kind, table, self.schedule(config, name))
        ts, orders = self._close(config, name, sig, times, kind, table)
        steps = steps[: len(ts) - 1]
        plan = Plan(ts, self._sampler(config, orders, ts[-1] == 0, len(sig)))
        bound_table = (ts[:-1][::-1].copy(), steps[::-1].astype(np.float64))
        flow_range = self._flow_range(ts) if kind == "flow" else None
        return plan._replace(family=DPMMultistepFamily(bound_table, flow_range))

    def _close(self, config, name, sig, times, kind, table):
        """The grid's end (σ = 0, or σ_min: the training table's, also for flow
        sigmas) and, where the last step σ_min → σ_min (the σ-grids' last σ is σ_min
        up to round-off) is the identity and dropped, diffusers' orders of the others
        (None otherwise)."""
        zero = config.get("final_sigmas_type", "zero") == "zero"
        last = 0.0 if zero else float(table.sigmas[0])
        end = 0.0 if zero else (last if kind == "flow" else 1.0 / len(table.sigmas))
        orders = None
        if not zero and abs(sig[-1] - last) <= 1e-12 * last:
            full = self._orders(config, len(sig))
            self._check_identity(config, full, sig[-1] == last)
            ts, orders = times, full[:-1]
        else:
            ts = np.concatenate([times, [end]])
        if len(ts) < 2 or not np.all(np.diff(ts) < 0):
            raise ValueError(
                f"{name}: the σ of the steps must decrease strictly down to the final "
                f"σ = {last} (final_sigmas_type); got {np.append(sig, last).tolist()}."
            )
        return ts, orders

    @staticmethod
    def _flow_range(ts):
        inner = ts[ts > 0]
        lo, hi = FlowMatching().t_min, FlowMatching().t_max
        if inner.min() >= lo and inner.max() <= hi:
            return None
        lo, hi = min(lo, 0.5 * inner.min()), max(hi, 0.5 * (1 + inner.max()))
        return (float(lo), float(hi))

    @staticmethod
    def _orders(config, n) -> np.ndarray:
        return multistep_orders(
            int(config.get("solver_order", 2)), n,
            bool(config.get("lower_order_final", True)),
            bool(config.get("euler_at_final", False)),
        )

    @staticmethod
    def _check_identity(config, orders, exact) -> None:
        """The dropped step σ_min → σ_min: diffusers' step of length h = 0 exactly
        divides 0 by h where its order is 3, or 2 with "heun" (NaN); an SDE step of
        round-off length adds noise of that length's square root."""
        if not exact and config.get("algorithm_type", "").startswith("sde"):
            raise _refuse("final_sigmas_type", "sigma_min", "ends this σ-grid with a "
                          "step from σ_min (up to round-off) to σ_min, whose length "
                          "h ~ 1e-16 is round-off, over which the SDE adds noise "
                          "σ √(2h) ξ ~ 1e-9 ξ (measured 2.5e-9) that cannot be "
                          "reproduced")
        heun = config.get("solver_type", "midpoint") == "heun"
        if exact and (orders[-1] == 3 or (orders[-1] == 2 and heun)):
            raise _refuse("final_sigmas_type", "sigma_min", "ends this grid with a "
                          f"step σ_min → σ_min of order {orders[-1]}, where diffusers' "
                          "update divides 0 by h = 0 and returns NaN (lower its order: "
                          "lower_order_final=True with fewer than 15 steps, or "
                          "euler_at_final=True)")

    @staticmethod
    def _sampler(config, orders, zero, n):
        algorithm = _algorithm(config)
        order = int(config.get("solver_order", 2))
        solver_type = config.get("solver_type", "midpoint")
        if solver_type in ("logrho", "bh1", "bh2"):  # diffusers registers midpoint
            solver_type = "midpoint"
        thr = None
        if config.get("thresholding", False):
            thr = (float(config.get("dynamic_thresholding_ratio", 0.995)),
                   float(config.get("sample_max_value", 1.0)))
        kw = dict(order=order, solver_type=solver_type,
                  lower_order_final=bool(config.get("lower_order_final", True)),
                  euler_at_final=bool(config.get("euler_at_final", False)),
                  orders=None if orders is None else tuple(int(k) for k in orders),
                  thresholding=thr)
        if algorithm == "dpmsolver++":
            return DPMSolverPP(**kw)
        if algorithm == "sde-dpmsolver++":
            return SDEDPMSolverPP(**kw)
        if algorithm == "dpmsolver":
            return DPMSolver(**kw)
        if zero:
            raise _refuse("final_sigmas_type", "zero", "ends sde-dpmsolver at σ = 0, "
                          "where its step's noise σ_s √(e^{2h} − 1) tends to "
                          "α_s σ_t/α_t, not 0 (diffusers refuses this too): use "
                          "'sigma_min', or 'sde-dpmsolver++'")
        if 3 in DPMMultistepFamily._orders(config, n):
            raise _refuse("solver_order", 3, "has third-order steps for sde-dpmsolver, "
                          "which diffusers does not implement (its step fails)")
        return DPMSolver(**(kw | {"order": min(order, 2)}), sde=True)


FAMILY = DPMMultistepFamily()
