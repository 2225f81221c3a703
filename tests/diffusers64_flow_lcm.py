"""diffusers' flow-matching, LCM and TCD schedulers in float64 (see `diffusers64`),
and their sampling loops with the scheduler's own normal draws replaced by given
noises.

`FLOW64` comes from `diffusers64`. LCM and TCD build ᾱ in float32 (patched to
float64 here) and LCM's boundary-condition scalings multiply the integer timestep
by a Python float, which torch does in float32 (patched to float64: a precision
cast like the others). TCD's intermediate timestep floor((1 − γ) · prev_timestep)
is also computed in float32 by torch; it is *not* patched: it decides an integer
timestep, and adjoint_jax mirrors diffusers' float32 product there.
"""

import contextlib

import numpy as np
import torch
from diffusers import LCMScheduler, TCDScheduler

from .diffusers64 import F64, _globals_with_f64_betas, _patched


def _init64(cls):
    glb = _globals_with_f64_betas(cls)
    return glb, _patched(
        cls.__init__,
        [
            ("dtype=torch.float32", "dtype=torch.float64", 3),
            ("torch.tensor(1.0)", "torch.tensor(1.0, dtype=torch.float64)", 1),
        ],
        glb,
    )


def _lcm():
    glb, init = _init64(LCMScheduler)
    scalings = _patched(
        LCMScheduler.get_scalings_for_boundary_condition_discrete,
        [
            (
                "scaled_timestep = timestep * self.config.timestep_scaling",
                "scaled_timestep = torch.as_tensor(timestep, dtype=torch.float64) "
                "* self.config.timestep_scaling",
                1,
            )
        ],
        glb,
    )
    return type(
        "LCMScheduler64",
        (LCMScheduler,),
        {
            "__init__": init,
            "get_scalings_for_boundary_condition_discrete": scalings,
        },
    )


def _tcd():
    _, init = _init64(TCDScheduler)
    return type("TCDScheduler64", (TCDScheduler,), {"__init__": init})


LCM64, TCD64 = _lcm(), _tcd()


class _Namespace:
    def __init__(self, d):
        self.__dict__["_d"] = d

    def __getattr__(self, k):
        return self._d[k]

    def __setattr__(self, k, v):
        self._d[k] = v


@contextlib.contextmanager
def fed_noise(scheduler, noise):
    """The scheduler module's `randn_tensor` returns `noise[0]`, `noise[1]`, … in
    turn; yields a list that counts the draws."""
    # The namespace `step` runs in (a float64-patched step has its own copy).
    module = _Namespace(type(scheduler).step.__globals__)
    bank = iter(torch.as_tensor(np.asarray(noise), dtype=F64))
    drawn = []
    original = module.randn_tensor

    def draw(shape, generator=None, device=None, dtype=None):
        drawn.append(shape)
        return next(bank).to(dtype)

    module.randn_tensor = draw
    try:
        yield drawn
    finally:
        module.randn_tensor = original


def run_loop(scheduler, model_fn, x_T, noise=None, output="prev_sample", **step_kw):
    """diffusers' loop: `model_fn(x, timestep)` with the scheduler's own timestep
    (a 0-d tensor); `output` names the `step` output the pipeline keeps at the end
    (`denoised` for LCM). With `noise`, the scheduler's draws are `noise[0]`, … .
    Returns (final latents, number of draws)."""
    x = torch.as_tensor(np.asarray(x_T), dtype=F64)
    ctx = fed_noise(scheduler, noise if noise is not None else np.zeros((0,)))
    with ctx as drawn:
        for t in scheduler.timesteps:
            out = scheduler.step(model_fn(x, t), t, x, **step_kw)
            x = out.prev_sample
            assert x.dtype == F64
        final = getattr(out, output)
    return final.numpy(), len(drawn)
