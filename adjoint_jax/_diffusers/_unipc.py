"""`UniPCMultistepScheduler`: `aj.UniPC(...)` with diffusers' options, on the grid
of `set_timesteps(num_steps, sigmas=, mu=)`.

- VP grids (`aj.VPDiscrete`): the integer timesteps of `timestep_spacing` (t =
  (n + 1)/T), or a Karras / exponential / beta σ-grid (t from λ = −log σ, the
  network's timestep diffusers' `_sigma_to_t`, rounded for Karras, truncated for
  the others); the last step goes to σ = 0 or to σ_min (`final_sigmas_type`).
  `rescale_betas_zero_snr` is reproduced with diffusers' override ᾱ_{T−1} = 2⁻²⁴.
- Flow grids (`use_flow_sigmas`, `aj.FlowMatching()`, t = σ): the shifted linspace
  (`flow_shift`, or `use_dynamic_shifting` with the pipeline's `mu`), the terminal
  stretch, a pipeline's `sigmas`, Karras σ mapped by σ/(1 + σ); diffusers' first σ
  is nudged from 1 to 1 − 10⁻⁶, and the network's timestep is T σ truncated to an
  integer (diffusers stores its timesteps as int64).

A grid whose last σ repeats (`final_sigmas_type="sigma_min"` on a Karras / exponential
/ beta / flow grid) ends with a zero-length step that diffusers still takes: one more
model evaluation, the corrector, and an identity predictor; `aj.UniPC(correct_last=
True)` on the grid without the repeat.
"""


import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .._model import as_eps
from .._samplers._unipc import UniPC
from .._schedule import FlowMatching, VPDiscrete
from ._config import Keys, betas_from_config
from ._ddim import vp_timesteps
from ._dpm_tables import Converted
from ._family import Family, Plan, refuse_args
from ._grids import (
    beta,
    exponential,
    flow_shift,
    karras,
    shift_terminal,
    sigma_to_index,
    time_shift,
    vp_times,
)
from ._net import Network, TimestepMap


_NAME = "UniPCMultistepScheduler"
_REFUSED = {
    "solver_p": ((None,), "replaces the UniP predictor by another scheduler's step"),
}
_KNOWN = frozenset({
    "solver_order", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
    "sample_max_value", "predict_x0", "solver_type", "lower_order_final",
    "disable_corrector", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "use_flow_sigmas", "flow_shift", "timestep_spacing",
    "steps_offset", "final_sigmas_type", "use_dynamic_shifting", "time_shift_type",
    "sigma_min", "sigma_max", "shift_terminal",
})
# Keys of other schedulers' configs (a shipped config switched to UniPC keeps them)
# that UniPCMultistepScheduler.__init__ does not take: diffusers ignores them.
_FOREIGN = frozenset({
    "algorithm_type", "clip_sample", "clip_sample_range", "euler_at_final",
    "interpolation_type", "lambda_min_clipped", "set_alpha_to_one", "skip_prk_steps",
    "timestep_type", "use_lu_lambdas", "variance_type",
})
_CONVERSIONS = {"use_karras_sigmas": karras, "use_exponential_sigmas": exponential,
                "use_beta_sigmas": beta}
# diffusers' first flow σ is at most 1 − 1e-6; its last may be any small σ.
_FLOW = FlowMatching(t_min=1e-9, t_max=1.0 - 1e-9)
_ZERO_SNR_ALPHA_BAR = 2.0**-24


def _refuse(key, value, why) -> ValueError:
    return ValueError(
        f"`config[{key!r}] = {value!r}` ({_NAME}) is not supported: {why}."
    )


def _conversion(config) -> str | None:
    kind = [k for k in _CONVERSIONS if config.get(k, False)]
    if len(kind) > 1:
        raise ValueError(
            f"at most one of config{list(_CONVERSIONS)} may be set ({_NAME})."
        )
    return kind[0] if kind else None


def _check(config) -> None:
    """Combinations diffusers rejects or turns into NaN."""
    flow = bool(config.get("use_flow_sigmas", False))
    kind = _conversion(config)
    if flow and kind in ("use_exponential_sigmas", "use_beta_sigmas"):
        raise _refuse(kind, True, (
            "with use_flow_sigmas diffusers keeps these variance-exploding σ (up to "
            "σ_max ≈ 157) and reads them as flow σ (α = 1 − σ < 0): its steps are NaN"
        ))
    pred = config.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "sample", "v_prediction", "flow_prediction"):
        raise _refuse("prediction_type", pred, "diffusers has no such prediction type")
    if pred == "flow_prediction" and not config.get("predict_x0", True):
        raise _refuse("prediction_type", pred, (
            "diffusers' noise-prediction UniPC (predict_x0=False) rejects it"
        ))
    if config.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        raise _refuse("final_sigmas_type", config["final_sigmas_type"],
                      "it must be 'zero' or 'sigma_min'")


def _alphas_cumprod(config, schedule: bool = True) -> np.ndarray:
    """ᾱ in float64 with diffusers' zero-SNR override ᾱ_{T−1} = 2⁻²⁴ (refused where
    it makes the VP `schedule` non-monotone; a flow grid only reads its σ)."""
    ab = np.cumprod(1.0 - betas_from_config(config))
    if config.get("rescale_betas_zero_snr", False):
        if schedule and not ab[-2] > _ZERO_SNR_ALPHA_BAR:
            raise _refuse("rescale_betas_zero_snr", True, (
                f"diffusers then overwrites ᾱ_{{T−1}} = 0 with 2⁻²⁴, above ᾱ_{{T−2}} = "
                f"{ab[-2]:.3g} for these betas: a noise level that decreases at the "
                "end is no VP schedule (a negative beta)"
            ))
        ab[-1] = _ZERO_SNR_ALPHA_BAR
    return ab


def _train_sigmas(config, schedule: bool = True) -> np.ndarray:
    ab = _alphas_cumprod(config, schedule)
    return np.sqrt((1.0 - ab) / ab)


class _FlowTimestep(eqx.Module):
    """T σ truncated to an integer, exactly as diffusers' float64 product and int64
    cast (no slack: t is the grid's σ itself, so T t is bitwise diffusers' value)."""

    scale: float = eqx.field(static=True)

    def __call__(self, schedule, t):
        return jnp.floor(self.scale * t).astype(jnp.int32)


def _timestep_map(config):
    T = int(config.get("num_train_timesteps", 1000))
    kind = _conversion(config)
    if config.get("use_flow_sigmas", False):
        return _FlowTimestep(float(T))
    if kind is None:
        return TimestepMap("knots", "round", scale=float(T))
    quantise = "round" if kind == "use_karras_sigmas" else "floor"
    return TimestepMap("log-index", quantise, xs=np.log(_train_sigmas(config)))


def _vp_sigmas(config, n, train):
    """(σ of the steps, the final σ, the int timesteps) of a VP grid."""
    T = int(config.get("num_train_timesteps", 1000))
    kind = _conversion(config)
    if kind is None:
        steps = vp_timesteps(config, _NAME, n, extra=True)
        sig = np.interp(steps, np.arange(T), train)
        return sig, train[0], steps
    lo, hi = config.get("sigma_min"), config.get("sigma_max")
    hi = train[-1] if hi is None else hi
    sig = _CONVERSIONS[kind](hi, train[0] if lo is None else lo, n)
    index = sigma_to_index(sig, train)
    steps = np.round(index) if kind == "use_karras_sigmas" else index
    return sig, sig[-1], steps.astype(np.int64)


def _flow_sigmas(config, n, given, mu):
    T = int(config.get("num_train_timesteps", 1000))
    if _conversion(config) == "use_karras_sigmas":
        # diffusers flips its input (the increasing training σ, or the given ones)
        # and ramps from its first to its last value.
        table = given if given is not None else _train_sigmas(config, schedule=False)
        flipped = table[::-1]
        lo, hi = config.get("sigma_min"), config.get("sigma_max")
        hi = flipped[0] if hi is None else hi
        sig = karras(hi, flipped[-1] if lo is None else lo, n)
        sig = sig / (sig + 1)
    else:
        sig = given if given is not None else np.linspace(1, 1 / T, n + 1)[:-1]
        if config.get("use_dynamic_shifting", False):
            sig = time_shift(sig, mu, config.get("time_shift_type", "exponential"))
        else:
            sig = flow_shift(sig, float(config.get("flow_shift", 1.0)))
        if config.get("shift_terminal"):
            sig = shift_terminal(sig, float(config["shift_terminal"]))
        sig = np.array(sig, np.float64)
        if abs(sig[0] - 1) < 1e-6:  # diffusers keeps log α finite at the first step
            sig[0] -= 1e-6
    return sig, sig[-1], (sig * T).astype(np.int64)


class UniPCFamily(Family):
    keys = {_NAME: Keys(_REFUSED, {}, _KNOWN | _FOREIGN)}

    def schedule(self, config, name):
        _check(config)
        if config.get("use_flow_sigmas", False):
            return _FLOW
        ab = _alphas_cumprod(config)
        betas = 1.0 - ab / np.concatenate([[1.0], ab[:-1]])
        return VPDiscrete(betas)

    def network(self, model, config, name):
        schedule = self.schedule(config, name)
        pred = config.get("prediction_type", "epsilon")
        flow = bool(config.get("use_flow_sigmas", False))
        net = Network(model, schedule, _timestep_map(config))
        odd = (pred == "v_prediction") if flow else (pred == "flow_prediction")
        if odd:
            kind = "flow" if pred == "flow_prediction" else "v"
            primary = "x0" if config.get("predict_x0", True) else "eps"
            return Converted(net, schedule, kind, primary)
        kinds = {"epsilon": "eps", "sample": "x0", "v_prediction": "v",
                 "flow_prediction": "flow"}
        return as_eps(net, schedule, kinds[pred])

    def sampler(self, config, n, correct_last):
        solver_type = config.get("solver_type", "bh2")
        if solver_type in ("midpoint", "heun", "logrho"):  # diffusers' own mapping
            solver_type = "bh2"
        if solver_type not in ("bh1", "bh2"):
            raise _refuse("solver_type", solver_type, "diffusers has bh1 and bh2")
        order = int(config.get("solver_order", 2))
        disabled = config.get("disable_corrector") or ()
        lof = bool(config.get("lower_order_final", True))
        predict_x0 = bool(config.get("predict_x0", True))
        threshold = None
        if config.get("thresholding", False) and predict_x0:  # (no effect on ε)
            threshold = (float(config.get("dynamic_thresholding_ratio", 0.995)),
                         float(config.get("sample_max_value", 1.0)))
        return UniPC(
            solver_order=order, solver_type=solver_type, predict_x0=predict_x0,
            lower_order_final=lof,
            disable_corrector=tuple(sorted({int(j) for j in disabled})),
            correct_last=correct_last, thresholding=threshold,
        )

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, timesteps=timesteps)
        _check(config)
        flow = bool(config.get("use_flow_sigmas", False))
        if sigmas is not None and not flow:
            raise ValueError(
                f"{_NAME}: custom `sigmas` need config['use_flow_sigmas'] = True "
                "(diffusers raises too)."
            )
        if eta:
            raise ValueError(
                f"`eta` is DDIM's; {_NAME}.step takes none (got eta={eta!r})."
            )
        if config.get("use_dynamic_shifting", False) and mu is None:
            raise ValueError(
                f"config['use_dynamic_shifting'] = True ({_NAME}) needs the "
                "pipeline's `mu`: pass `mu=` as the pipeline passes it."
            )
        n = len(sigmas) if sigmas is not None else num_steps
        if flow:
            sig, last, steps = _flow_sigmas(config, n, sigmas, mu)
        else:
            sig, last, steps = _vp_sigmas(config, n, _train_sigmas(config))
        if config.get("final_sigmas_type", "zero") == "zero":
            last = 0.0
        sig = np.append(sig, last)
        _refuse_singular(config, steps, sig)
        correct_last = bool(sig[-1] == sig[-2])
        if correct_last:
            sig = sig[:-1]
            if len(sig) < 2:
                raise ValueError(f"{_NAME}: one step of zero length (σ to the same σ).")
        if np.any(np.diff(sig) >= 0):
            raise ValueError(f"{_NAME}: the σ grid is not strictly decreasing: {sig}.")
        ts = self._times(config, sig, steps, flow)
        return Plan(ts, self.sampler(config, len(ts) - 1, correct_last))

    def _times(self, config, sig, steps, flow):
        if flow:
            return sig
        if _conversion(config) is None:  # the integer timesteps' knots, exactly
            T = int(config.get("num_train_timesteps", 1000))
            knots = (steps + 1) / T
            if len(sig) == len(knots):  # the repeated last σ was dropped
                return knots
            return np.append(knots, 0.0 if sig[-1] == 0 else 1.0 / T)
        schedule = self.schedule(config, _NAME)
        ts = vp_times(schedule, sig)
        # The ramps end on the table's σ_max and σ_min (t = 1 and 1/T), which the λ
        # round trip may miss by an ulp.
        return np.where(ts > 0, np.clip(ts, schedule.t_min, schedule.t_max), ts)


def _refuse_singular(config, steps, sig) -> None:
    """The settings where diffusers itself returns NaN or inf, or indexes past its
    grid (no finite result to reproduce)."""
    order = int(config.get("solver_order", 2))
    lof = bool(config.get("lower_order_final", True))
    n = len(steps)
    last_order = 1 if lof else min(order, n)
    if sig[-1] == 0 and last_order >= 2:
        raise _refuse("lower_order_final", False, (
            f"the last step to σ = 0 is then of order {last_order}: diffusers divides "
            "m₁ − m₀ by r = (λ₁ − λ₀)/h = 0 (h = ∞) and returns inf/NaN, and the step "
            "has no finite limit"
        ))
    if sig[-1] == sig[-2] and last_order >= 3:
        raise _refuse("final_sigmas_type", "sigma_min", (
            "its last σ repeats, and diffusers' zero-length last step of order "
            f"{last_order} (lower_order_final=False) solves a singular system: NaN"
        ))
    if np.sum(steps == steps[0]) > 1:
        raise ValueError(
            f"{_NAME}: the first timestep {int(steps[0])} repeats ({steps.tolist()[:4]}"
            "...): diffusers' step then starts from the second σ and indexes past the "
            "end of its grid."
        )


FAMILY = UniPCFamily()
