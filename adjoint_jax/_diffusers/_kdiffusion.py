"""The k-diffusion (σ-space) schedulers' shared reading of a config: the training
table (with zero-SNR's 2⁻²⁴), `set_timesteps`' σ-grid (spacings, linear
interpolation, Karras / exponential / beta ramps), the `aj` times of its σ
(`aj.VPDiscrete`'s knots, in NumPy float64), and `KFamily`, the base of the Euler,
Heun, KDPM2 and LMS families (`_euler.py`, `_heun.py`, `_kdpm2.py`, `_lms.py`).

These schedulers keep the variance-exploding latents y = x/α and step in
σ = √((1 − ᾱ)/ᾱ) (= e^{−λ}); `scale_model_input` hands the network y/√(σ² + 1) = x,
`aj`'s state. So x_T = α_T · z · `init_noise_sigma` (`init_scale`), the last step
ends on y = x/α (`final_scale`), and each grid σ is the `aj.VPDiscrete` time with
λ = −log σ.

The network's timestep is the scheduler's own: the spacing's value with σ
interpolated linearly in the training table (`TimestepMap("linear-index")`),
`_sigma_to_t` (log-σ interpolation: "log-index") for Karras / exponential / beta
grids, and the given values on the grid ("table", through a plan-bound family)
where they are no function of σ.
"""

import math
from typing import NamedTuple

import numpy as np

from .._schedule import VPDiscrete
from ._config import betas_from_config
from ._family import Family, Plan
from ._grids import beta, exponential, karras, sigma_to_index
from ._net import TimestepMap, network, prediction_of


# ---- the training table -------------------------------------------------------------
ZERO_SNR_ALPHA_BAR = 2.0**-24  # what these schedulers put in place of ᾱ_{T−1} = 0


def k_alpha_bars(config, name: str) -> np.ndarray:
    """ᾱ_n of `__init__` in float64: the DDPM betas (plus Heun's `beta_schedule="exp"`),
    and under `rescale_betas_zero_snr` the last ᾱ set to 2⁻²⁴ (not 0: "so the first σ
    is not inf"), which must keep ᾱ decreasing."""
    if config.get("beta_schedule") == "exp" and config.get("trained_betas") is None:
        if name != "HeunDiscreteScheduler":
            raise ValueError(
                f"`config['beta_schedule'] = 'exp'` is HeunDiscreteScheduler's only; "
                f"{name} raises NotImplementedError for it."
            )
        # betas_for_alpha_bar with ᾱ(t) = e^{−12 t}, as diffusers evaluates it.
        n = int(config.get("num_train_timesteps", 1000))
        bar = lambda t: math.exp(t * -12.0)
        betas = np.array(
            [min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)]
        )
    else:
        betas = betas_from_config(config)
    ab = np.cumprod(1.0 - betas)
    if config.get("rescale_betas_zero_snr", False):
        if not ab[-2] > ZERO_SNR_ALPHA_BAR:
            raise ValueError(
                f"`config['rescale_betas_zero_snr'] = True` ({name}) is not supported "
                f"for these betas: diffusers replaces ᾱ_(T−1) = 0 by 2⁻²⁴, above "
                f"ᾱ_(T−2) = {ab[-2]:.3g}, so its σ table is not monotone."
            )
        ab[-1] = ZERO_SNR_ALPHA_BAR
    return ab


def k_betas(config, name: str) -> np.ndarray:
    ab = k_alpha_bars(config, name)
    return 1.0 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])


def k_train_sigmas(config, name: str) -> np.ndarray:
    """σ_n = √((1 − ᾱ_n)/ᾱ_n), increasing in n."""
    ab = k_alpha_bars(config, name)
    return np.sqrt((1 - ab) / ab)


# ---- set_timesteps ------------------------------------------------------------------
class KGrid(NamedTuple):
    """What `set_timesteps` leaves: the σ at the start of each step and where the last
    one ends (`sigmas`, one more than `timesteps`), the network's timestep at each
    step start, the `TimestepMap` kind that gives it, and `init_noise_sigma`."""

    sigmas: np.ndarray
    timesteps: np.ndarray
    kind: str
    init_noise_sigma: float


CONVERSIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def conversion(config, name: str) -> str | None:
    kind = [k for k in CONVERSIONS if config.get(k, False)]
    if len(kind) > 1:
        raise ValueError(
            f"at most one of config{list(CONVERSIONS)} may be set ({name}); got {kind}."
        )
    return kind[0] if kind else None


def spacing_timesteps(config, name: str, n: int) -> np.ndarray:
    """The timesteps of `timestep_spacing` (float64; fractional for "linspace")."""
    T = int(config.get("num_train_timesteps", 1000))
    spacing = config.get("timestep_spacing", "linspace")
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1] + int(
            config.get("steps_offset", 0)
        )
    if spacing == "trailing":
        return np.arange(T, 0, -T / n).round() - 1
    raise ValueError(
        "`config['timestep_spacing']` must be 'linspace', 'leading' or 'trailing' "
        f"({name}); got {spacing!r}."
    )


def convert(
    config, kind: str, sig: np.ndarray, n: int, config_range: bool
) -> np.ndarray:
    """`_convert_to_karras/exponential/beta`: the ramp between the interpolated
    grid's ends (or the config's `sigma_min`/`sigma_max` where the class has them)."""
    lo = config.get("sigma_min") if config_range else None
    hi = config.get("sigma_max") if config_range else None
    lo = float(sig[-1]) if lo is None else float(lo)
    hi = float(sig[0]) if hi is None else float(hi)
    fn = {
        "use_karras_sigmas": karras,
        "use_exponential_sigmas": exponential,
        "use_beta_sigmas": beta,
    }[kind]
    return np.asarray(fn(hi, lo, n), np.float64)


def init_noise_sigma(config, sigmas: np.ndarray) -> float:
    top = float(np.max(sigmas))
    if config.get("timestep_spacing", "linspace") in ("linspace", "trailing"):
        return top
    return math.sqrt(top**2 + 1)


def k_grid(
    config,
    name: str,
    n: int | None,
    *,
    timesteps=None,
    config_range=False,
    conversions=True,
):
    """`set_timesteps` of Heun, KDPM2, LMS and Euler (without its extra options): the
    spacing's (or the given) timesteps, σ interpolated linearly in the table, then a
    Karras / exponential / beta ramp with `_sigma_to_t` timesteps (where the class
    has them: not Euler a, which ignores those keys); the last step ends at σ = 0."""
    train = k_train_sigmas(config, name)
    if timesteps is not None:
        steps = np.asarray(timesteps, np.float64)
        if n is not None and n != len(steps):
            raise ValueError(f"`num_steps`={n} must equal len(timesteps)={len(steps)}.")
        n, kind = len(steps), "table"
    else:
        steps, kind = spacing_timesteps(config, name, n), "linear-index"
    sig = np.interp(steps, np.arange(len(train)), train)
    conv = conversion(config, name) if conversions else None
    if conv is not None:
        sig = convert(config, conv, sig, n, config_range)
        steps, kind = sigma_to_index(sig, train), "log-index"
    full = np.concatenate([sig, [0.0]])
    return KGrid(full, steps, kind, init_noise_sigma(config, full))


# ---- the plan -----------------------------------------------------------------------

class WideVPDiscrete(VPDiscrete):
    """`aj.VPDiscrete` whose time range reaches a grid beyond the training table's σ
    (a Karras/exponential/beta ramp to `sigma_min` below σ_0, or from `sigma_max`
    above σ_(T−1)): log α continues linearly from the table's first segment (to
    α = 1 at t = 0) and its last (beyond t = 1), and `t_of_lam` inverts that."""

    def __init__(self, betas, t_range: tuple[float, float]):
        super().__init__(betas)
        self.t_min, self.t_max = t_range


def knot_times(log_alphas: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """`aj.VPDiscrete(betas).t_of_lam(−log σ)` in NumPy float64 (whatever
    `jax_enable_x64` says): log α = −½ log(1 + σ²) located between the knots
    t = k/T, where log α is linear in t (continued linearly beyond the table's
    ends, as `WideVPDiscrete` continues it); σ = 0 is t = 0."""
    sigmas = np.asarray(sigmas, np.float64)
    T = len(log_alphas)
    knots = np.arange(T + 1) / T
    neg = -np.concatenate([[0.0], log_alphas])  # −log α at the knots, increasing
    target = 0.5 * np.log1p(sigmas**2)
    idx = np.clip(np.searchsorted(neg, target, side="right") - 1, 0, T - 1)
    l0, l1 = neg[idx], neg[idx + 1]
    return knots[idx] + (target - l0) * (knots[idx + 1] - knots[idx]) / (l1 - l0)


def grid_times(grid: KGrid, train: np.ndarray, schedule) -> np.ndarray:
    """`aj` times of the grid's σ: a training σ (to round-off: a ramp's end is
    `(σ^(1/ρ))^ρ`) on its knot (n + 1)/T, others by λ = −log σ, σ = 0 at t = 0."""
    times = knot_times(np.asarray(schedule.log_alphas, np.float64), grid.sigmas)
    idx = np.clip(np.searchsorted(train, grid.sigmas), 1, len(train) - 1)
    for k in (idx - 1, idx):
        on_knot = np.abs(train[k] - grid.sigmas) <= 1e-12 * train[k]
        times[on_knot] = (k[on_knot] + 1) / len(train)
    return times


def time_range(times: np.ndarray, T: int) -> tuple[float, float] | None:
    """A range for `WideVPDiscrete` holding every positive time, or None if
    `aj.VPDiscrete`'s [1/T, 1] does."""
    inner = times[times > 0]
    lo, hi = 1.0 / T, 1.0
    if inner.min() >= lo and inner.max() <= hi:
        return None
    return min(lo, 0.5 * inner.min()), max(hi, 1.0 + 2.0 * (inner.max() - 1.0))


def check_grid(config, name: str, grid: KGrid, times: np.ndarray) -> None:
    if not np.all(np.diff(times) < 0):
        raise ValueError(
            f"{name}: the grid's σ must decrease strictly; got {grid.sigmas.tolist()}."
        )
    if np.sum(grid.timesteps == grid.timesteps[0]) > 1:
        hint = ""
        if config.get("sigma_max") is not None:
            hint = (
                f" (config['sigma_max'] = {config['sigma_max']} lies above the "
                "training table's largest σ, whose timestep the ramp's top ones share)"
            )
        raise ValueError(
            f"{name}: the first timestep {grid.timesteps[0]} occurs twice in "
            f"{grid.timesteps.tolist()}{hint}; diffusers' index_for_timestep then "
            "starts at its second occurrence and its loop runs past the last σ."
        )


def timestep_map(grid: KGrid, train: np.ndarray, times: np.ndarray) -> TimestepMap:
    if grid.kind == "linear-index":
        return TimestepMap("linear-index", xs=train)
    if grid.kind == "log-index":
        return TimestepMap("log-index", xs=np.log(train))
    if grid.kind == "log-sigma":
        return TimestepMap("log-sigma", scale=0.25)
    return TimestepMap(
        "table", xs=times[:-1][::-1].copy(), ys=grid.timesteps[::-1].copy()
    )


class KFamily(Family):
    """The shared part of the k-diffusion families: `aj.VPDiscrete` of the (possibly
    zero-SNR-overridden) table, and the network called with the timestep of the
    grid's `TimestepMap` (`tmap`, when bound to a grid; else the config's own kind)."""

    def __init__(self, tmap: TimestepMap | None = None, t_range=None):
        self.tmap, self.t_range = tmap, t_range

    def schedule(self, config, name):
        if self.t_range is None:
            return VPDiscrete(k_betas(config, name))
        return WideVPDiscrete(k_betas(config, name), tuple(map(float, self.t_range)))

    def default_kind(self, config, name) -> str:
        return "log-index" if conversion(config, name) else "linear-index"

    def network(self, model, config, name):
        tmap = self.tmap
        if tmap is None:
            train = k_train_sigmas(config, name)
            grid = KGrid(None, None, self.default_kind(config, name), 0.0)
            tmap = timestep_map(grid, train, None)
        return network(
            model, self.schedule(config, name), tmap, prediction_of(config, name)
        )

    def k_plan(
        self, config, name, grid: KGrid, sampler, *, ode: bool, mids=None
    ) -> Plan:
        """The plan of `grid` run by `sampler`; an ODE sampler's last step of zero
        length (σ_min to σ_min) is the identity and is dropped. `mids`: (σ, timestep)
        of the evaluations between the grid's points (KDPM2's)."""
        train = k_train_sigmas(config, name)
        times = grid_times(grid, train, self.schedule(config, name))
        t_range = time_range(times, len(train))
        if (
            ode
            and len(times) > 2
            and abs(grid.sigmas[-1] - grid.sigmas[-2]) <= (1e-12 * grid.sigmas[-2])
        ):
            grid = grid._replace(sigmas=grid.sigmas[:-1], timesteps=grid.timesteps[:-1])
            times = times[:-1]
        check_grid(config, name, grid, times)
        init = grid.init_noise_sigma / math.sqrt(grid.sigmas[0] ** 2 + 1)
        final = math.sqrt(grid.sigmas[-1] ** 2 + 1)
        plan = Plan(times, sampler, init, final)
        if mids is None:
            tmap = None
            if grid.kind != self.default_kind(config, name):
                tmap = timestep_map(grid, train, times)
        else:
            tmap = self.mid_map(config, name, grid, train, times, mids)
        if tmap is not None or t_range is not None:
            plan = plan._replace(family=type(self)(tmap, t_range))
        return plan

    def mid_map(self, config, name, grid, train, times, mids) -> TimestepMap | None:
        """None where the config's own map gives the timesteps at the grid's points
        and at `mids`; else a table of both (refused where one σ needs two)."""
        sig = np.concatenate([grid.sigmas[: len(grid.timesteps)], mids[0]])
        taus = np.concatenate([grid.timesteps, mids[1]])
        kind = self.default_kind(config, name)
        if np.allclose(kind_timesteps(kind, sig, train), taus, rtol=0, atol=1e-9):
            return None
        log_alphas = np.asarray(self.schedule(config, name).log_alphas, np.float64)
        xs = np.concatenate(
            [times[: len(grid.timesteps)], knot_times(log_alphas, mids[0])]
        )
        order = np.argsort(xs)
        xs, ys = xs[order], taus[order]
        clash = (np.diff(xs) <= 1e-12 * xs[1:]) & (np.abs(np.diff(ys)) > 1e-9)
        if np.any(clash):
            raise ValueError(
                f"{name}: the network is called twice at the noise level σ = "
                f"{sig[order][1:][clash][0]:.6g} with different timesteps "
                f"({ys[1:][clash][0]:.6g} and {ys[:-1][clash][0]:.6g}: the step's own "
                "timestep — the `timestep_spacing` value, or with use_karras_sigmas "
                "the "
                "rounded `_sigma_to_t` — and `_sigma_to_t` at the interpolated σ), "
                "which no function of the time reproduces; the two agree with "
                "timestep_spacing='leading' or 'trailing' (without use_karras_sigmas) "
                "and with use_exponential_sigmas or use_beta_sigmas."
            )
        return TimestepMap("table", xs=xs, ys=ys)


def kind_timesteps(kind: str, sig: np.ndarray, train: np.ndarray) -> np.ndarray:
    """The timesteps a `TimestepMap` kind gives at σ `sig`, in NumPy float64."""
    if kind == "log-index":
        return sigma_to_index(sig, train)
    if kind == "linear-index":
        return np.interp(sig, train, np.arange(len(train)))
    return 0.25 * np.log(sig)


# Keys of other schedulers that pipeline configs carry along (`from_config` keeps
# them): each class ignores those that are not its own parameters.
FOREIGN = frozenset(
    {
        "clip_sample",
        "clip_sample_range",
        "set_alpha_to_one",
        "skip_prk_steps",
        "sample_max_value",
        "thresholding",
        "dynamic_thresholding_ratio",
        "variance_type",
        "solver_order",
        "solver_type",
        "lower_order_final",
        "algorithm_type",
        "euler_at_final",
        "lambda_min_clipped",
        "use_lu_lambdas",
        "use_flow_sigmas",
        "flow_shift",
        "final_sigmas_type",
        "interpolation_type",
        "timestep_type",
        "sigma_min",
        "sigma_max",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "disable_corrector",
        "predict_x0",
        "original_inference_steps",
        "timestep_scaling",
        "shift",
        "use_dynamic_shifting",
        "base_shift",
        "max_shift",
        "base_image_seq_len",
        "max_image_seq_len",
        "time_shift_type",
        "invert_sigmas",
        "shift_terminal",
        "stochastic_sampling",
        "noise_sampler_seed",
        "s_noise",
        "rho",
    }
)


def refuse_eta(name: str, eta) -> None:
    if eta:
        raise ValueError(f"`eta` is DDIM's; {name}.step takes none (got eta={eta!r}).")
