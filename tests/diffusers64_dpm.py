"""diffusers' EDM schedulers in float64 for the parity tests of
`tests/test_diffusers_dpm.py` (`DPMSolverMultistepScheduler` needs nothing beyond
`tests/diffusers64.DPM64`). As in `tests/diffusers64.py`, each float32 cast on the
compared code paths is replaced in the installed source, each replacement asserting
its count; everything else is diffusers' own code."""

import sys

import numpy as np
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from .diffusers64 import F64, _patched


def _exponential(cls, glb):
    # torch.linspace's default dtype is float32.
    return _patched(cls._compute_exponential_sigmas, [
        ("torch.linspace(math.log(sigma_min), math.log(sigma_max), len(ramp))",
         "torch.linspace(math.log(sigma_min), math.log(sigma_max), len(ramp), "
         "dtype=torch.float64)", 1),
    ], glb)


def _edm_dpm():
    cls = EDMDPMSolverMultistepScheduler
    glb = dict(sys.modules[cls.__module__].__dict__)
    set_timesteps = _patched(cls.set_timesteps, [
        ("torch.linspace(0, 1, self.num_inference_steps)",
         "torch.linspace(0, 1, self.num_inference_steps, dtype=torch.float64)", 1),
        ("sigmas.to(dtype=torch.float32, device=device)",
         "sigmas.to(dtype=torch.float64, device=device)", 1),
        ("torch.tensor([sigma_last], dtype=torch.float32, device=device)",
         "torch.tensor([sigma_last], dtype=torch.float64, device=device)", 1),
    ], glb)
    return type("EDMDPMSolverMultistepScheduler64", (cls,), {
        "set_timesteps": set_timesteps,
        "_compute_exponential_sigmas": _exponential(cls, glb),
    })


def _edm_euler():
    cls = EDMEulerScheduler
    glb = dict(sys.modules[cls.__module__].__dict__)
    set_timesteps = _patched(cls.set_timesteps, [
        ("sigmas.to(dtype=torch.float32, device=device)",
         "sigmas.to(dtype=torch.float64, device=device)", 1),
        ("torch.full((1,), fill_value=sigma_last, device=sigmas.device)",
         "torch.full((1,), fill_value=sigma_last, device=sigmas.device, "
         "dtype=torch.float64)",
         1),
    ], glb)
    step = _patched(cls.step, [
        ("sample = sample.to(torch.float32)", "sample = sample.to(torch.float64)", 1),
    ], glb)
    return type("EDMEulerScheduler64", (cls,), {
        "set_timesteps": set_timesteps,
        "step": step,
        "_compute_exponential_sigmas": _exponential(cls, glb),
    })


EDMDPM64, EDMEULER64 = _edm_dpm(), _edm_euler()


def run_edm(scheduler, net, z, noise=None):
    """The EDM pipelines' loop: latents = z · init_noise_sigma, then per timestep
    `net(scale_model_input(latents, t), t)` and `step`; `noise[i]` is the standard
    normal that step i draws (`randn_tensor`, patched for the loop)."""
    module = sys.modules[type(scheduler).__mro__[1].__module__]
    bank = None if noise is None else iter(torch.as_tensor(np.asarray(noise)))
    original = module.randn_tensor
    module.randn_tensor = lambda shape, generator=None, device=None, dtype=None: (
        next(bank).to(dtype)
    )
    try:
        x = torch.as_tensor(np.asarray(z), dtype=F64) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = net(scheduler.scale_model_input(x, t), t)
            x = scheduler.step(out, t, x).prev_sample
            assert x.dtype == F64
    finally:
        module.randn_tensor = original
    return x.numpy()
