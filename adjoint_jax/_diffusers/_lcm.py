"""`LCMScheduler` (latent consistency models, LCM LoRAs) and `TCDScheduler` (TCD
LoRAs): `aj.LCM()` and `aj.TCD(gamma, mids)` on the integer timesteps of
`set_timesteps` (t = (n + 1)/T on `aj.VPDiscrete`).

**LCM's boundary condition lives in the model adapter.** LCM's step turns the
network's output into x̂_0 by `prediction_type` (then `clip_sample` /
`thresholding`), and then into its `denoised` = c_skip(n) x_t + c_out(n) x̂_0 with
c_skip = σ_d²/((k n)² + σ_d²), c_out = k n/√((k n)² + σ_d²), σ_d = 0.5, k =
`timestep_scaling` and n the integer timestep. That is the consistency function's
parameterisation, a property of the distilled network, not of the sampler: so the
adapter (`_LCMDenoiser`, an `aj.AbstractPredictor`) returns `denoised` as the data
prediction (and the matching ε), and `aj.LCM()` stays the generic consistency
step x_s = α_s x̂_0 + σ_s ξ. The last step goes to t = 0, where the state is
`denoised` itself: the pipeline's returned latents.

What changes the numbers and is reproduced: `original_inference_steps`,
`timestep_scaling`, `prediction_type`, `clip_sample` (+ range), `thresholding`
(+ ratio, max value) for LCM, TCD's γ (`eta`), custom `timesteps`, the betas
(incl. `rescale_betas_zero_snr`). What diffusers reads but which changes nothing
(no refusal needed): `timestep_spacing`, `steps_offset` (neither `set_timesteps`
reads them), `set_alpha_to_one` (LCM's and TCD's next timestep is never negative),
and for TCD `timestep_scaling`, `clip_sample`, `thresholding` (its step never
reads them). `set_timesteps(strength=...)` (img2img) is no argument of
`aj.from_diffusers`: pass the timesteps the img2img pipeline's scheduler ends up
with (`timesteps=scheduler.timesteps`) and start from its noised image latents.
"""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._model import AbstractPredictor
from .._samplers._lcm import LCM
from .._samplers._tcd import TCD
from .._samplers._x0_clip import clip_sample, dynamic_threshold
from .._schedule import AbstractSchedule, VPDiscrete
from ._config import Keys, betas_from_config
from ._ddim import knots_network
from ._family import Family, Plan, refuse_args
from ._net import prediction_of


_KNOWN = frozenset(
    {
        "original_inference_steps",
        "clip_sample",
        "clip_sample_range",
        "set_alpha_to_one",
        "steps_offset",
        "prediction_type",
        "thresholding",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        "timestep_spacing",
        "timestep_scaling",
    }
)
_SIGMA_DATA = 0.5


class _LCMDenoiser(AbstractPredictor):
    """LCM's `denoised` as the data prediction: x̂_0 of the network (`inner`, an
    `aj.as_eps` predictor calling it with the integer timestep), clipped or
    thresholded as configured, then c_skip(n) x + c_out(n) x̂_0 with n the integer
    timestep; ε = (x − α denoised)/σ to match."""

    inner: AbstractPredictor
    schedule: AbstractSchedule
    timestep: Callable
    scaling: float = eqx.field(static=True)
    clip: float | None = eqx.field(static=True)
    threshold: tuple[float, float] | None = eqx.field(static=True)

    def predict(self, params, x, t, cond):
        _, x0 = self.inner.predict(params, x, t, cond)
        if self.threshold is not None:
            x0 = dynamic_threshold(x0, *self.threshold)
        elif self.clip is not None:
            x0 = clip_sample(x0, self.clip)
        # c_skip, c_out of diffusers' get_scalings_for_boundary_condition_discrete.
        n = self.timestep(self.schedule, t).astype(jnp.result_type(t))
        k = self.scaling * n
        c_skip = _SIGMA_DATA**2 / (k * k + _SIGMA_DATA**2)
        c_out = k / jnp.sqrt(k * k + _SIGMA_DATA**2)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)

        def both(xx, o):
            den = c_out.astype(xx.dtype) * o + c_skip.astype(xx.dtype) * xx
            return (xx - alpha.astype(xx.dtype) * den) / sigma.astype(xx.dtype), den

        pairs = jtu.tree_map(both, x, x0)
        is_pair = lambda v: isinstance(v, tuple)
        eps = jtu.tree_map(lambda p: p[0], pairs, is_leaf=is_pair)
        return eps, jtu.tree_map(lambda p: p[1], pairs, is_leaf=is_pair)


def consistency_timesteps(config, name: str, n: int) -> np.ndarray:
    """The integer timesteps of `set_timesteps(n)` (LCM's and, with the config's
    `original_inference_steps`, TCD's): the distillation schedule k·m − 1, m = 1 …
    S (S = original_inference_steps, k = T // S), reversed and subsampled at
    floor(linspace(0, S, n, endpoint=False))."""
    T = int(config.get("num_train_timesteps", 1000))
    orig = int(config.get("original_inference_steps", 50))
    if orig > T or n > T:
        raise ValueError(
            f"{name}: original_inference_steps={orig} and num_inference_steps={n} may "
            f"not exceed num_train_timesteps={T}."
        )
    if n > orig:
        raise ValueError(
            f"{name}: num_inference_steps={n} exceeds "
            f"config['original_inference_steps']"
            f"={orig} (the timesteps are a subset of the distillation schedule's)."
        )
    origin = (np.arange(1, orig + 1) * (T // orig) - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[idx]


def _custom(config, name: str, num_steps, timesteps) -> np.ndarray:
    T = int(config.get("num_train_timesteps", 1000))
    if num_steps is not None:
        raise ValueError(
            f"{name}.set_timesteps takes either `num_steps` or `timesteps`, not both; "
            f"got num_steps={num_steps} and {len(timesteps)} timesteps."
        )
    steps = np.asarray(timesteps).astype(np.int64)  # diffusers' np.array(..., int64)
    if steps.ndim != 1 or np.any(np.diff(steps) >= 0) or steps[0] >= T or steps[-1] < 0:
        raise ValueError(
            f"{name}: custom `timesteps` must be strictly decreasing integers in "
            f"[0, {T}); got {steps.tolist()}."
        )
    return steps


def tcd_mids(steps: np.ndarray, gamma: float, T: int) -> tuple[float, ...]:
    """TCD's intermediate times: timestep floor((1 − γ) p) for the next timestep p
    (0 after the last), the product taken in float32 as torch takes it (a long
    tensor times a Python float), at t = (index + 1)/T."""
    nxt = np.concatenate([steps[1:], [0]]).astype(np.float32)
    idx = np.floor(np.float32(1.0 - gamma) * nxt).astype(np.int64)
    return tuple(float(v) for v in (idx + 1) / T)


class ConsistencyFamily(Family):
    keys = {
        "LCMScheduler": Keys({}, {}, _KNOWN),
        "TCDScheduler": Keys({}, {}, _KNOWN),
    }

    def schedule(self, config, name):
        return VPDiscrete(betas_from_config(config))

    def network(self, model, config, name):
        net = knots_network(model, config, self.schedule(config, name), name=name)
        if name == "TCDScheduler":
            return net
        threshold = None
        if config.get("thresholding", False):
            threshold = (
                float(config.get("dynamic_thresholding_ratio", 0.995)),
                float(config.get("sample_max_value", 1.0)),
            )
        clip = None
        if config.get("clip_sample", False):
            clip = float(config.get("clip_sample_range", 1.0))
        return _LCMDenoiser(
            net,
            net.schedule,
            net.model.timestep,
            float(config.get("timestep_scaling", 10.0)),
            clip,
            threshold,
        )

    def plan(self, config, name, num_steps, *, sigmas, timesteps, mu, eta):
        refuse_args(name, sigmas=sigmas, mu=mu)
        if prediction_of(config, name) not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(
                f"`config['prediction_type'] = {config['prediction_type']!r}` ({name}) "
                "is not supported: diffusers' step takes 'epsilon', 'sample', "
                "'v_prediction'."
            )
        T = int(config.get("num_train_timesteps", 1000))
        if timesteps is not None:
            steps = _custom(config, name, num_steps, timesteps)
        else:
            steps = consistency_timesteps(config, name, num_steps)
        times = (steps + 1) / T
        if name == "LCMScheduler":
            if eta:
                raise ValueError(
                    f"`eta` is DDIM's and TCD's; LCMScheduler.step takes none "
                    f"(got {eta!r})."
                )
            return Plan(np.concatenate([times, [0.0]]), LCM())
        if not 0 <= eta <= 1:
            raise ValueError(
                f"TCDScheduler's `eta` (TCD's gamma) must lie in [0, 1]; got {eta!r}."
            )
        mids = tcd_mids(steps, float(eta), T)
        if steps[-1] == 0:  # a last step from timestep 0 to timestep 0: the identity
            return Plan(times, TCD(float(eta), mids[:-1]))
        return Plan(np.concatenate([times, [1.0 / T]]), TCD(float(eta), mids))


FAMILY = ConsistencyFamily()
