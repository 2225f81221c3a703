"""`FlowMatchEulerDiscreteScheduler` (SD3, FLUX, LTX-Video, HunyuanVideo, …):
`aj.DPMSolver1()` (on `aj.FlowMatching()` its step is exactly the Euler step of the
velocity, x_s = x_t + (s − t) u, since the interpolation is linear) or, with
`stochastic_sampling`, `aj.LCM()` (x_s = (1 − s) x̂_0 + s ξ), on the grid of
`set_timesteps(num_steps, sigmas=, mu=, timesteps=)`: σ = t from diffusers' first σ
down to its last, then 0.

Every option that changes the numbers is reproduced: the static `shift`, dynamic
shifting with the pipeline's `mu` (`time_shift_type` exponential or linear),
pipeline-passed `sigmas` (FLUX.1-schnell, HunyuanVideo) and `timesteps` (the network
then gets the given timesteps: a `TimestepMap("table")`), `shift_terminal`
(LTX-Video), Karras / exponential / beta σ-grids, `invert_sigmas` (the network's
time runs from data to noise and its output is the negated velocity), and
`num_train_timesteps`; a grid reaching below `aj.FlowMatching()`'s default t_min
(or above its t_max) gets a schedule whose range includes it. `step`'s `s_churn`,
`s_tmin`, `s_tmax`, `s_noise` are unused by diffusers' step (no change to the
numbers). Refused: `stochastic_sampling` with `invert_sigmas` (see
`_refuse_combinations`); `step(per_token_timesteps=)` (one σ per token) is no
option of `from_diffusers`.

`from_diffusers` asks the plan's family for the schedule and the network: with
`timesteps=` (or an extended range) `plan` returns a `Plan` carrying a family bound
to them (`Plan.family`), since `Family.network` sees the config only.
"""

import equinox as eqx
import numpy as np

from .._samplers._dpm_solver import DPMSolver1
from .._samplers._lcm import LCM
from .._schedule import FlowMatching
from ._config import Keys
from ._family import Family, Plan
from ._grids import beta, exponential, flow_shift, karras, shift_terminal, time_shift
from ._net import TimestepMap, network


_NAME = "FlowMatchEulerDiscreteScheduler"
_REFUSED = {
    "time_shift_type": (("exponential", "linear"), "is not a time shift diffusers has"),
}
_KNOWN = frozenset(
    {
        "shift",
        "use_dynamic_shifting",
        "base_shift",
        "max_shift",
        "base_image_seq_len",
        "max_image_seq_len",
        "invert_sigmas",
        "shift_terminal",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "stochastic_sampling",
    }
)
_CONVERSIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


class _Inverted(eqx.Module):
    """A network of diffusers' `invert_sigmas` convention as one of the usual one:
    diffusers steps the inverted s = 1 − σ upwards, x ← x + (s_next − s) · out, and
    calls the network with timestep T s; in σ = t this is the Euler step of the
    velocity u = −out, so `aj` sees −model(params, x, T (1 − t), cond)."""

    model: object
    num_train_timesteps: float = eqx.field(static=True)

    def __call__(self, params, x, t, cond):
        out = self.model(params, x, self.num_train_timesteps * (1.0 - t), cond)
        return -out


def _train_sigma_range(config) -> tuple[float, float]:
    """(σ_max, σ_min) of `__init__`'s training table: σ_n = n/T, n = T … 1, with the
    static shift applied unless dynamic shifting is on."""
    T = int(config.get("num_train_timesteps", 1000))
    sig = np.linspace(1, T, T, dtype=np.float64)[::-1].copy() / T
    if not config.get("use_dynamic_shifting", False):
        sig = flow_shift(sig, float(config.get("shift", 1.0)))
    return float(sig[0]), float(sig[-1])


def _check_lengths(num_steps, sigmas, timesteps) -> int:
    for arg, given in (("sigmas", sigmas), ("timesteps", timesteps)):
        if given is not None and (given.ndim != 1 or len(given) < 1):
            raise ValueError(
                f"`{arg}` must be a non-empty 1-D sequence; got {given!r}."
            )
    if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
        raise ValueError(
            f"`sigmas` and `timesteps` must have the same length; got {len(sigmas)} "
            f"and {len(timesteps)}."
        )
    given = sigmas if sigmas is not None else timesteps
    if num_steps is not None and given is not None and len(given) != num_steps:
        raise ValueError(
            f"`num_steps`={num_steps} must equal the length of the given `sigmas` / "
            f"`timesteps` ({len(given)}), as diffusers requires."
        )
    return num_steps if num_steps is not None else len(given)


def flow_sigmas(config, num_steps, sigmas, timesteps, mu) -> np.ndarray:
    """The σ of each step (before `invert_sigmas`), in float64, as `set_timesteps`
    computes them: from the given `sigmas`, else from the given `timesteps` / T, else
    T-scaled linspace(σ_max, σ_min); then the static shift or the dynamic time shift
    with `mu`, the terminal stretch, and a Karras / exponential / beta conversion."""
    T = int(config.get("num_train_timesteps", 1000))
    n = _check_lengths(num_steps, sigmas, timesteps)
    if sigmas is None:
        if timesteps is None:
            hi, lo = _train_sigma_range(config)
            timesteps = np.linspace(hi * T, lo * T, n)
        sigmas = timesteps / T
    if config.get("use_dynamic_shifting", False):
        if mu is None:
            raise ValueError(
                f"config['use_dynamic_shifting'] = True ({_NAME}) needs the pipeline's "
                "`mu` (its resolution-dependent shift): pass `mu=` to from_diffusers, "
                "as the pipeline passes it to set_timesteps."
            )
        sigmas = time_shift(sigmas, mu, config.get("time_shift_type", "exponential"))
    else:
        sigmas = flow_shift(sigmas, float(config.get("shift", 1.0)))
    if config.get("shift_terminal"):
        sigmas = shift_terminal(sigmas, float(config["shift_terminal"]))
    kind = [k for k in _CONVERSIONS if config.get(k, False)]
    if len(kind) > 1:
        raise ValueError(
            f"at most one of config{list(_CONVERSIONS)} may be set ({_NAME}); "
            f"got {kind}."
        )
    convert = {
        "use_karras_sigmas": karras,
        "use_exponential_sigmas": exponential,
        "use_beta_sigmas": beta,
    }
    if kind:
        sigmas = convert[kind[0]](float(sigmas[0]), float(sigmas[-1]), n)
    return np.asarray(sigmas, np.float64)


def _refuse_combinations(config, eta) -> None:
    if eta:
        raise ValueError(f"`eta` is DDIM's; {_NAME}.step takes none (got eta={eta!r}).")
    if config.get("stochastic_sampling", False) and config.get("invert_sigmas", False):
        raise ValueError(
            f"config['stochastic_sampling'] = True with config['invert_sigmas'] = True "
            f"({_NAME}) is not supported: diffusers' stochastic step then treats the "
            "inverted s = 1 − σ (the data fraction) as the noise level, "
            "x̂_0 = x − s·out "
            "is the noise estimate and x_next = (1 − s_next) x̂_0 + s_next ξ re-noises "
            "with data and noise exchanged, which is no sampler of the model's flow."
        )


def _grid(sig: np.ndarray) -> np.ndarray:
    """`aj.sample`'s ts: the step σ then 0; a last σ of 0 makes the step to 0 the
    identity (diffusers' dt = 0), which is dropped."""
    if not (np.all(np.isfinite(sig)) and np.all(sig >= 0) and sig[0] <= 1):
        raise ValueError(f"the σ grid must lie in [0, 1]; got {sig}.")
    ts = np.concatenate([sig, [0.0]]) if sig[-1] > 0 else sig
    if len(ts) < 2 or np.any(np.diff(ts) >= 0):
        raise ValueError(
            "the σ of the steps (from `sigmas`/`timesteps` after diffusers' shifts) "
            f"must decrease strictly and end above 0 or at a single 0; got {sig}."
        )
    return ts


class FlowMatchFamily(Family):
    """The family; an instance bound to a plan (`timesteps`, or a grid outside
    `aj.FlowMatching()`'s default range) builds that plan's schedule and network."""

    keys = {_NAME: Keys(_REFUSED, {}, _KNOWN)}

    def __init__(self, table=None, t_range=None):
        self.table = table  # (times increasing, the network's timesteps there)
        self.t_range = t_range

    def schedule(self, config, name):
        if self.t_range is None:
            return FlowMatching()
        return FlowMatching(t_min=self.t_range[0], t_max=self.t_range[1])

    def network(self, model, config, name):
        T = float(config.get("num_train_timesteps", 1000))
        if config.get("invert_sigmas", False):
            return network(
                _Inverted(model, T), FlowMatching(), TimestepMap("flow"), "flow"
            )
        if self.table is not None:
            xs, ys = self.table
            return network(
                model, FlowMatching(), TimestepMap("table", xs=xs, ys=ys), "flow"
            )
        return network(model, FlowMatching(), TimestepMap("flow", scale=T), "flow")

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        _refuse_combinations(config, eta)
        sig = flow_sigmas(config, num_steps, sigmas, timesteps, mu)
        ts = _grid(sig)
        sampler = LCM() if config.get("stochastic_sampling", False) else DPMSolver1()
        plan = Plan(ts, sampler)
        table = None
        if timesteps is not None and not config.get("invert_sigmas", False):
            table = (sig[::-1].copy(), np.asarray(timesteps, np.float64)[::-1].copy())
        inner = ts[(ts > 0) & (ts < 1)]
        lo, hi = FlowMatching().t_min, FlowMatching().t_max
        t_range = None
        if len(inner) and (inner.min() < lo or inner.max() > hi):
            t_range = (float(min(lo, 0.5 * inner.min())),
                       float(max(hi, 0.5 * (1 + inner.max()))))
        if table is not None or t_range is not None:
            plan = plan._replace(family=FlowMatchFamily(table, t_range))
        return plan


FAMILY = FlowMatchFamily()
