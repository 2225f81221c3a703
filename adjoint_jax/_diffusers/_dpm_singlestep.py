"""`DPMSolverSinglestepScheduler`: `aj.DPMSolverSinglestep(solver_order, solver_type,
algorithm_type, lower_order_final)` on the grid of every noise level the scheduler
evaluates at (its `sigmas`): the integer timesteps of `set_timesteps` (t = (n + 1)/T
on `aj.VPDiscrete`), or a Karras / exponential / beta σ-grid (λ = −log σ), or flow
sigmas on `aj.FlowMatching()`; ending at σ = 0 or at σ_min (`final_sigmas_type`).

Also the σ-grid helpers `DEISMultistepScheduler` shares (`sigma_grid`, `sigma_network`,
`prediction_kind`): both classes build their grids with the same code in diffusers.
"""

import math
from collections.abc import Callable

import equinox as eqx
import jax.tree_util as jtu
import numpy as np

from .._model import as_eps
from .._samplers._dpm_singlestep import DPMSolverSinglestep, singlestep_orders
from .._schedule import FlowMatching, VPDiscrete
from ._config import Keys, betas_from_config, train_sigmas
from ._family import Family, Plan, refuse_args
from ._grids import beta, exponential, flow_shift, karras, sigma_to_index, vp_times
from ._net import Network, TimestepMap, network


_NAME = "DPMSolverSinglestepScheduler"
_SIGMA_KINDS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "use_flow_sigmas")


def thresholding_of(config):
    """(dynamic_thresholding_ratio, sample_max_value) when `thresholding` is on."""
    if not config.get("thresholding", False):
        return None
    return (float(config.get("dynamic_thresholding_ratio", 0.995)),
            float(config.get("sample_max_value", 1.0)))


_KNOWN = frozenset({
    "solver_order", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
    "sample_max_value",
    "algorithm_type", "solver_type", "lower_order_final", "final_sigmas_type",
    "lambda_min_clipped", "variance_type", "use_dynamic_shifting", "time_shift_type",
    "flow_shift", *_SIGMA_KINDS,
})


def vp_config(config):
    """The config without `rescale_betas_zero_snr`, which these classes do not take
    (diffusers ignores it; `betas_from_config` would apply it)."""
    return {k: v for k, v in config.items() if k != "rescale_betas_zero_snr"}


def sigma_kind(config, name: str) -> str | None:
    """Which σ-grid option is set (at most one: diffusers refuses two of Karras,
    exponential and beta, and a Karras/exponential/beta grid with flow sigmas would
    read VE noise levels as flow ones)."""
    on = [k for k in _SIGMA_KINDS if config.get(k)]
    if len(on) > 1:
        raise ValueError(
            f"{name}: at most one of {', '.join(f'`{k}`' for k in _SIGMA_KINDS)} may be "
            f"set; got {on}."
        )
    return on[0] if on else None


def prediction_kind(config, name: str, algorithm: str = "dpmsolver++") -> str:
    """How the network's output becomes ε: `network`'s prediction for
    `prediction_type`, or one of diffusers' own conversions that no `aj.as_eps`
    parameterisation gives on this grid: "v-x0" (a v-prediction on flow sigmas, where
    diffusers takes x̂_0 = α x − σ v though α² + σ² ≠ 1), "v-eps" (the same, for the
    noise-prediction algorithm: ε = α v + σ x), "flow-x0" (a flow prediction on VP
    sigmas: x̂_0 = x − σ̃ u with the variance-exploding σ̃ = σ/α), "flow-deis" (the
    same in DEIS, whose ε = (x − α x̂_0)/σ̃ then divides by σ̃ too: ε = α u +
    (1 − α) x/σ̃)."""
    kind = config.get("prediction_type", "epsilon")
    flow = bool(config.get("use_flow_sigmas", False))
    kinds = {"epsilon": "epsilon", "sample": "sample", "v_prediction": "v_prediction",
             "flow_prediction": "flow"}
    if kind not in kinds:
        raise ValueError(
            f"`config['prediction_type'] = {kind!r}` ({name}) is not supported; "
            f"supported: {tuple(kinds)}."
        )
    if kind == "flow_prediction" and algorithm == "dpmsolver":
        raise ValueError(
            f"`config['prediction_type'] = 'flow_prediction'` ({name}) is refused by "
            "diffusers itself for algorithm_type='dpmsolver'."
        )
    if kind == "v_prediction" and flow:
        return "v-eps" if algorithm == "dpmsolver" else "v-x0"
    if kind == "flow_prediction" and not flow:
        # DEIS then also divides by σ̃ in ε = (x − α x̂_0)/σ̃ (its `sigma_t`, overwritten).
        return "flow-deis" if algorithm == "deis" else "flow-x0"
    return kinds[kind]


class _Converted(eqx.Module):
    """`net`'s output (at the pipeline's timestep) turned into x̂_0 or ε by diffusers'
    own formula (`prediction_kind`), with α, σ of `schedule` at t."""

    net: Callable
    schedule: object
    mode: str = eqx.field(static=True)

    def __call__(self, params, x, t, cond):
        out = self.net(params, x, t, cond)

        def leaf(xx, o):
            a = self.schedule.alpha(t).astype(xx.dtype)
            s = self.schedule.sigma(t).astype(xx.dtype)
            if self.mode == "v-x0":
                return (a * xx - s * o.astype(xx.dtype)).astype(o.dtype)
            if self.mode == "v-eps":
                return (a * o.astype(xx.dtype) + s * xx).astype(o.dtype)
            if self.mode == "flow-deis":
                return (a * o.astype(xx.dtype) + (1 - a) * (a / s) * xx).astype(o.dtype)
            return (xx - (s / a) * o.astype(xx.dtype)).astype(o.dtype)  # flow-x0

        return jtu.tree_map(leaf, x, out)


def vp_schedule(config):
    return VPDiscrete(betas_from_config(vp_config(config)))


def schedule_of(config):
    return FlowMatching() if config.get("use_flow_sigmas", False) else vp_schedule(config)


def sigma_network(model, config, name, algorithm="dpmsolver++", table=None):
    """The network as these schedulers call it: the timestep is the integer training
    timestep (default grids), round(`_sigma_to_t`) (Karras), `_sigma_to_t` truncated
    to int64 (exponential, beta), or T σ truncated (flow sigmas). With `table` (a
    plan's: increasing times, diffusers' timesteps there) the network gets exactly
    those; without, the map from the noise level (whose truncation may differ from
    diffusers' where T σ or `_sigma_to_t` falls within round-off of an integer)."""
    kind = sigma_kind(config, name)
    prediction = prediction_kind(config, name, algorithm)
    schedule = schedule_of(config)
    T = int(config.get("num_train_timesteps", 1000))
    if table is not None:
        tmap = TimestepMap("table", "round", xs=table[0], ys=table[1])
    elif kind == "use_flow_sigmas":
        tmap = TimestepMap("flow", "floor", scale=float(T))
    elif kind is None:
        tmap = TimestepMap("knots", "round", scale=float(T))
    else:
        log_sig = np.log(train_sigmas(vp_config(config)))
        tmap = TimestepMap("log-index", "round" if kind == "use_karras_sigmas" else "floor",
                           xs=log_sig)
    if prediction in ("v-x0", "v-eps", "flow-x0", "flow-deis"):
        converted = _Converted(Network(model, schedule, tmap), schedule, prediction)
        as_eps_kind = "eps" if prediction in ("v-eps", "flow-deis") else "x0"
        return as_eps(converted, schedule, as_eps_kind)
    return network(model, schedule, tmap, prediction)


def diffusers_sigma_to_t(sigmas: np.ndarray, train: np.ndarray) -> np.ndarray:
    """`_sigma_to_t` in diffusers' own arithmetic (the bracketing training indices,
    then the weight of the upper one, clipped), so that its truncation to int64
    agrees bit for bit."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    log_train = np.log(train)
    above = (log_sigma[None, :] - log_train[:, None]) >= 0
    low = np.minimum(np.cumsum(above, axis=0).argmax(axis=0), len(train) - 2)
    w = np.clip((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def grid_timesteps(config, kind: str, sig: np.ndarray) -> np.ndarray:
    """The network's timesteps on a σ-grid, as `set_timesteps` casts them: Karras'
    `_sigma_to_t` rounded, exponential / beta ones truncated, flow sigmas' T σ
    truncated."""
    if kind == "use_flow_sigmas":
        return (sig * int(config.get("num_train_timesteps", 1000))).astype(np.int64)
    taus = diffusers_sigma_to_t(sig, train_sigmas(vp_config(config)))
    return (taus.round() if kind == "use_karras_sigmas" else taus).astype(np.int64)


def bind(plan: Plan, family_cls, times: np.ndarray, taus: np.ndarray) -> Plan:
    """`plan` with `family_cls(table)`: the network gets `taus[k]` at `times[k]`."""
    table = (times[::-1].copy(), taus[::-1].astype(np.float64))
    return plan._replace(family=family_cls(table))


def flow_shift_of(config, name: str, mu):
    """`flow_shift`, or e^μ when the pipeline passes `mu` (diffusers asserts dynamic
    shifting with an exponential time shift, and then overwrites `flow_shift`)."""
    if mu is None:
        return float(config.get("flow_shift", 1.0))
    if not config.get("use_dynamic_shifting", False) or (
        config.get("time_shift_type", "exponential") != "exponential"
    ):
        raise ValueError(
            f"{name}.set_timesteps(mu=...) needs `config['use_dynamic_shifting'] = True` "
            "and `config['time_shift_type'] = 'exponential'`."
        )
    return math.exp(mu)


def sigma_grid(config, name: str, n: int, kind: str, mu) -> np.ndarray:
    """The n noise levels of a Karras / exponential / beta grid (VE σ, from the
    training table's extremes) or of flow sigmas (the flow σ), in float64."""
    if kind == "use_flow_sigmas":
        T = int(config.get("num_train_timesteps", 1000))
        shift = flow_shift_of(config, name, mu)
        sig = 1.0 - np.linspace(1, 1 / T, n + 1)
        return np.flip(flow_shift(sig, shift))[:-1].copy()
    table = train_sigmas(vp_config(config))
    lo, hi = float(table[0]), float(table[-1])
    if kind == "use_karras_sigmas":
        return karras(hi, lo, n)
    if kind == "use_exponential_sigmas":
        return exponential(hi, lo, n)
    return beta(hi, lo, n)


def grid_times(config, sigmas: np.ndarray, kind: str) -> np.ndarray:
    """`aj` times of the noise levels of `sigma_grid`: by λ = −log σ, and a training
    σ (a Karras / exponential / beta grid's ends, which the ramp reproduces to a few
    ulps) on its knot (n + 1)/T."""
    if kind == "use_flow_sigmas":
        return sigmas
    times = vp_times(vp_schedule(config), sigmas)
    train = train_sigmas(vp_config(config))
    hi = np.clip(np.searchsorted(train, sigmas), 1, len(train) - 1)
    idx = np.where(np.abs(train[hi] - sigmas) < np.abs(train[hi - 1] - sigmas), hi, hi - 1)
    on_knot = np.abs(train[idx] - sigmas) <= 1e-12 * sigmas
    times[on_knot] = (idx[on_knot] + 1) / len(train)
    return times


def sigma_index(config, sigmas: np.ndarray) -> np.ndarray:
    """diffusers' `_sigma_to_t` of VE noise levels (the network's fractional
    timesteps before rounding or truncation)."""
    return sigma_to_index(sigmas, train_sigmas(vp_config(config)))


def _default_steps(config, n: int) -> np.ndarray:
    """`set_timesteps(n)`'s integer timesteps, clipped at `lambda_min_clipped`."""
    T = int(config.get("num_train_timesteps", 1000))
    ab = np.cumprod(1.0 - betas_from_config(vp_config(config)))
    lam = 0.5 * np.log(ab) - 0.5 * np.log(1.0 - ab)
    clip = float(config.get("lambda_min_clipped", -math.inf))
    clipped = int(np.searchsorted(np.flip(lam), clip))
    return np.linspace(0, T - 1 - clipped, n + 1).round()[::-1][:-1].astype(np.int64)


def _check_algorithm(config, name):
    algorithm = config.get("algorithm_type", "dpmsolver++")
    if algorithm == "deis":  # diffusers maps it to dpmsolver++
        algorithm = "dpmsolver++"
    if algorithm not in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"):
        raise ValueError(
            f"`config['algorithm_type'] = {algorithm!r}` ({name}) is not supported; "
            "supported: 'dpmsolver++', 'dpmsolver', 'sde-dpmsolver++'."
        )
    if algorithm == "dpmsolver" and config.get("final_sigmas_type", "zero") == "zero":
        raise ValueError(
            f"`config['final_sigmas_type'] = 'zero'` ({name}) is refused by diffusers "
            "for algorithm_type='dpmsolver'; use 'sigma_min'."
        )
    return algorithm


class _FirstChannels(eqx.Module):
    """A network whose ε output carries a learned variance in extra channels:
    diffusers keeps `model_output[:, :3]`."""

    model: Callable

    def __call__(self, params, x, timestep, cond):
        return self.model(params, x, timestep, cond)[:, :3]


class DPMSinglestepFamily(Family):
    keys = {_NAME: Keys({}, {}, _KNOWN)}

    def __init__(self, table=None):
        self.table = table  # a plan's (times increasing, the network's timesteps)

    def schedule(self, config, name):
        return schedule_of(config)

    def network(self, model, config, name):
        algorithm = _check_algorithm(config, name)
        variance = config.get("variance_type")
        if variance in ("learned", "learned_range"):
            if config.get("prediction_type", "epsilon") != "epsilon":
                raise ValueError(
                    f"`config['variance_type'] = {variance!r}` ({name}) is only read "
                    "with prediction_type='epsilon' (diffusers then keeps "
                    "model_output[:, :3]); with another prediction the output's "
                    "variance channels reach the update."
                )
            model = _FirstChannels(model)
        elif variance is not None:
            raise ValueError(
                f"`config['variance_type']` ({name}) must be None, 'learned' or "
                f"'learned_range'; got {variance!r}."
            )
        return sigma_network(model, config, name, algorithm, self.table)

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, sigmas=sigmas)
        algorithm = _check_algorithm(config, name)
        prediction_kind(config, name, algorithm)
        kind = sigma_kind(config, name)
        if timesteps is not None and kind not in (None, "use_flow_sigmas"):
            raise ValueError(f"{name}: custom `timesteps` cannot be used with `{kind}`.")
        if mu is not None:
            flow_shift_of(config, name, mu)
        n = len(timesteps) if timesteps is not None else num_steps
        T = int(config.get("num_train_timesteps", 1000))
        if kind is not None:
            sig = sigma_grid(config, name, n, kind, mu)
            times = grid_times(config, sig, kind)
        else:
            steps = (np.asarray(timesteps).astype(np.int64) if timesteps is not None
                     else _default_steps(config, n))
            times = (steps + 1) / T
        final = config.get("final_sigmas_type", "zero")
        if final not in ("zero", "sigma_min"):
            raise ValueError(
                f"`config['final_sigmas_type']` ({name}) must be 'zero' or 'sigma_min'; "
                f"got {final!r}."
            )
        if final == "zero":
            end = 0.0
        elif kind == "use_flow_sigmas":  # diffusers' VP σ_min, read as a flow σ
            end = float(train_sigmas(vp_config(config))[0])
        else:
            end = 1.0 / T
        order = int(config.get("solver_order", 2))
        solver_type = config.get("solver_type", "midpoint")
        if solver_type in ("logrho", "bh1", "bh2"):  # diffusers maps these to midpoint
            solver_type = "midpoint"
        lower = bool(config.get("lower_order_final", False)) or final == "zero"
        thr = thresholding_of(config)
        if end < times[-1]:
            sampler = DPMSolverSinglestep(order, solver_type, algorithm, lower,
                                          thresholding=thr)
            plan = Plan(np.concatenate([times, [end]]), sampler)
        else:
            plan = Plan(times, _zero_length_end(name, order, solver_type, algorithm, lower,
                                                n, thr))
        if kind is None:
            return plan
        return bind(plan, DPMSinglestepFamily, times, grid_timesteps(config, kind, sig))


def _zero_length_end(name, order, solver_type, algorithm, lower, n, thr):
    """The sampler of a grid whose last σ is already the final σ_min (a Karras /
    exponential / beta grid, or custom timesteps ending at 0, with
    `final_sigmas_type="sigma_min"`): diffusers' last step σ_min → σ_min is the
    identity when it is of order 1 (dropped), else it evaluates the model at its own
    target and redoes its macro step's update (`reevaluate_last`)."""
    orders = tuple(int(k) for k in singlestep_orders(order, n, lower))
    if orders[-1] == 1:
        if n < 2:
            raise ValueError(f"{name} with 1 step on this grid takes only an identity step.")
        return DPMSolverSinglestep(order, solver_type, algorithm, lower, orders[:-1],
                                   thresholding=thr)
    if algorithm == "sde-dpmsolver++":
        raise ValueError(
            f"`config['algorithm_type'] = 'sde-dpmsolver++'` ({name}) with "
            "final_sigmas_type='sigma_min' on a grid that already ends at σ_min is not "
            "supported: diffusers' last step (σ_min to σ_min, of order "
            f"{orders[-1]}) re-evaluates the model at its own target and draws a second "
            "normal, which aj's one noise per step cannot carry."
        )
    return DPMSolverSinglestep(order, solver_type, algorithm, lower, orders, True, thr)


FAMILY = DPMSinglestepFamily()
