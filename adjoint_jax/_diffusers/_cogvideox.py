"""`CogVideoXDPMScheduler` (CogVideoX-5b's model-card scheduler): `aj.CogVideoXDPM`
(SDE-DPM-Solver++ 2M, midpoint) on the integer timesteps of `set_timesteps`
(t = (n + 1)/T on `aj.VPDiscrete`), on `CogVideoXDDIMScheduler`'s ᾱ.

- Schedule: ᾱ ↦ ᾱ/(s + (1 − s) ᾱ) (`snr_shift_scale` s), then zero terminal SNR on
    ᾱ itself (`rescale_betas_zero_snr`): `_ddim.cogvideox_betas`.
- Grid: diffusers' 'linspace' / 'leading' (+ `steps_offset`) / 'trailing'
    timesteps; step i goes from timestep n_i to n_i − T // N, or to
    `final_alpha_cumprod` below 0 (ᾱ = 1 with `set_alpha_to_one`, else ᾱ_0). Where
    that is not the next timestep ('trailing' with N ∤ T, 'linspace') the sampler
    gets per-step `targets`; an identity last step (ᾱ_0 → ᾱ_0) is dropped.
- Orders: the first step, and a step to `final_alpha_cumprod`, are first order
    (diffusers' `old_pred_original_sample is None or prev_timestep < 0`).
- The pipeline passes back the `pred_original_sample` that `step` returns (the
    plain x̂_0, not the extrapolated one) and `timesteps[i − 1]` as `timestep_back`;
    `CogVideoXDPM` keeps the previous x̂_0 and λ of the previous grid time.
- Ignored by diffusers' step, so here: `eta`, `clip_sample`, `clip_sample_range`,
    `sample_max_value` (it never clips).
- Noise: `noise[i]` is the normal step i uses; `aj.CogVideoXDPM.used_draws(N)`
    lists which of diffusers' draws that is (it draws two per second-order step
    and keeps the second).
"""

import numpy as np

from .._samplers._cogvideox_dpm import CogVideoXDPM
from .._schedule import VPDiscrete
from ._config import Keys
from ._ddim import cogvideox_betas, knots_network, vp_timesteps
from ._family import Family, Plan, refuse_args
from ._net import prediction_of


NAME = "CogVideoXDPMScheduler"
_KNOWN = frozenset({
    "steps_offset", "prediction_type", "timestep_spacing", "set_alpha_to_one",
    "snr_shift_scale", "clip_sample", "clip_sample_range", "sample_max_value",
})
_PREDICTIONS = ("epsilon", "sample", "v_prediction")


def _check(config, first_step: int) -> None:
    shift = float(config.get("snr_shift_scale", 3.0))
    if not shift > 0:
        raise ValueError(
            f"`config['snr_shift_scale'] = {shift!r}` ({NAME}) is not supported: "
            "ᾱ/(s + (1 − s) ᾱ) with s ≤ 0 is 1 everywhere (s = 0) or crosses 0 and "
            "turns negative, so diffusers' log-SNR and latents are NaN. Use s > 0."
        )
    kind = prediction_of(config, NAME, "epsilon")
    if kind not in _PREDICTIONS:
        raise ValueError(
            f"`config['prediction_type'] = {kind!r}` ({NAME}) is not supported: its "
            f"step raises for it; supported: {_PREDICTIONS}."
        )
    T = int(config.get("num_train_timesteps", 1000))
    zero_snr = config.get("rescale_betas_zero_snr", False)
    if kind == "epsilon" and zero_snr and first_step == T - 1:
        raise ValueError(
            f"`config['rescale_betas_zero_snr'] = True` with "
            f"`config['prediction_type'] = 'epsilon'` ({NAME}) is not supported "
            f"when the first timestep is {T - 1} (`config['timestep_spacing']` "
            "'trailing' or 'linspace'): ᾱ = 0 there, where diffusers' step divides "
            "by √ᾱ = 0 (x̂_0 = (x − √(1 − ᾱ) ε)/√ᾱ) and its latents are NaN. Use "
            "prediction_type='v_prediction' (as CogVideoX) or 'sample'."
        )


def _grid(config, n: int):
    """(the grid's times, the per-step targets, whether the last step is first
    order) of `set_timesteps(n)` followed by `step`."""
    T = int(config.get("num_train_timesteps", 1000))
    steps = vp_timesteps(config, NAME, n)
    _check(config, int(steps[0]))
    prev = steps - T // n
    final = 0.0 if config.get("set_alpha_to_one", True) else 1.0 / T
    targets = np.where(prev >= 0, (prev + 1) / T, final)
    first = prev < 0
    first[0] = True
    if np.any(prev[:-1] < 0):
        raise AssertionError(f"{NAME}: a step before the last goes below 0: {steps}")
    times = (steps + 1) / T
    if targets[-1] == times[-1]:
        # ᾱ_0 → ᾱ_0 (set_alpha_to_one=False, last timestep 0): diffusers' step is
        # then exactly the identity (h = 0, no noise), dropped.
        if n == 1:
            raise ValueError(
                f"{NAME} with one step from timestep 0 and `config['set_alpha_to_one']"
                " = False` is the identity (ᾱ_0 to ᾱ_0), which aj.sample's grid of "
                "at least one step cannot hold; its result is the initial latents."
            )
        return times, targets[:-1], bool(first[-2])
    return np.concatenate([times, targets[-1:]]), targets, bool(first[-1])


class CogVideoXFamily(Family):
    keys = {NAME: Keys({}, {}, _KNOWN)}

    def schedule(self, config, name):
        return VPDiscrete(cogvideox_betas(config))

    def network(self, model, config, name):
        return knots_network(model, config, self.schedule(config, name), name=name)

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        del eta  # CogVideoXDPMScheduler.step ignores η
        refuse_args(name, sigmas=sigmas, timesteps=timesteps, mu=mu)
        ts, targets, first_last = _grid(config, num_steps)
        on_grid = np.array_equal(targets[:-1], ts[1:-1]) and targets[-1] == ts[-1]
        sampler = CogVideoXDPM(
            targets=None if on_grid else tuple(float(v) for v in targets),
            first_order_last=first_last,
        )
        return Plan(ts, sampler)


FAMILY = CogVideoXFamily()
