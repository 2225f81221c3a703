"""diffusers' `CogVideoXDDIMScheduler` in float64 (see `tests/diffusers64.py`), and
the loops that drive the DDIM-family schedulers with given noises."""

import numpy as np
import torch
from diffusers import CogVideoXDDIMScheduler

from .diffusers64 import F64, _globals_with_f64_betas, _patched


def _cogvideox():
    cls = CogVideoXDDIMScheduler
    glb = _globals_with_f64_betas(cls)
    init = _patched(
        cls.__init__,
        [
            ("dtype=torch.float32", "dtype=torch.float64", 2),
            ("torch.tensor(1.0)", "torch.tensor(1.0, dtype=torch.float64)", 1),
        ],
        glb,
    )
    return type("CogVideoXDDIMScheduler64", (cls,), {"__init__": init})


COGVIDEOX64 = _cogvideox()


def run_ddim(scheduler, model_fn, x_T, noise=None, **step_kw):
    """DDIM's loop with `model_fn(x, timestep)` (a torch function of the latents and
    the integer timestep) and `noise[i]` as step i's `variance_noise`."""
    x = torch.as_tensor(np.asarray(x_T), dtype=F64) if not torch.is_tensor(x_T) else x_T
    for i, t in enumerate(scheduler.timesteps):
        kw = dict(step_kw)
        if noise is not None:
            kw["variance_noise"] = torch.as_tensor(np.asarray(noise[i]), dtype=F64)
        x = scheduler.step(model_fn(x, int(t)), t, x, **kw).prev_sample
        assert x.dtype == F64
    return x


def run_ddpm(scheduler, model_fn, x_T, noise):
    """DDPM's loop; it draws its noise inside `step` (`randn_tensor`), so step i is
    fed `noise[i]` through the module's `randn_tensor`."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    bank = iter(torch.as_tensor(np.asarray(noise), dtype=F64))
    original = ddpm_module.randn_tensor
    ddpm_module.randn_tensor = lambda shape, generator=None, device=None, dtype=None: (
        next(bank).to(dtype)
    )
    try:
        return run_ddim(scheduler, model_fn, x_T)
    finally:
        ddpm_module.randn_tensor = original
