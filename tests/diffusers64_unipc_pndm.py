"""diffusers' `UniPCMultistepScheduler` and `PNDMScheduler` in float64, for parity
tests at 1e-10 (the approach of `tests/diffusers64.py`: each float32 cast in the
methods we compare with is replaced in the installed source, and each replacement
asserts how often it occurs)."""

import numpy as np
import torch
from diffusers import PNDMScheduler, UniPCMultistepScheduler

from .diffusers64 import F64, _globals_with_f64_betas, _patched


def _unipc():
    cls = UniPCMultistepScheduler
    glb = _globals_with_f64_betas(cls)
    init = _patched(
        cls.__init__, [("dtype=torch.float32", "dtype=torch.float64", 3)], glb
    )
    set_timesteps = _patched(
        cls.set_timesteps, [(".astype(np.float32)", ".astype(np.float64)", 5)], glb
    )
    # The `1` appended to the ratios r_k is a float32 scalar (exact, but torch.stack
    # would promote nothing else): make it float64 too.
    ones = [("rks.append(torch.ones((), device=device))",
             "rks.append(torch.ones((), device=device, dtype=torch.float64))", 1)]
    pred = _patched(cls.multistep_uni_p_bh_update, ones, glb)
    corr = _patched(cls.multistep_uni_c_bh_update, ones, glb)
    return type("UniPCMultistepScheduler64", (cls,), {
        "__init__": init, "set_timesteps": set_timesteps,
        "multistep_uni_p_bh_update": pred, "multistep_uni_c_bh_update": corr,
    })


def _pndm():
    cls = PNDMScheduler
    glb = _globals_with_f64_betas(cls)
    init = _patched(
        cls.__init__,
        [
            ("dtype=torch.float32", "dtype=torch.float64", 3),
            ("torch.tensor(1.0)", "torch.tensor(1.0, dtype=torch.float64)", 1),
        ],
        glb,
    )
    return type("PNDMScheduler64", (cls,), {"__init__": init})


UNIPC64, PNDM64 = _unipc(), _pndm()


def run_loop(scheduler, model_fn, x_T, init_sigma: float = 1.0):
    """A pipeline's loop: `model_fn(x, timestep)` with the scheduler's own timestep
    (`scale_model_input` is the identity for both schedulers); x_T the standard-normal
    draw."""
    x = torch.as_tensor(np.asarray(x_T), dtype=F64) * init_sigma
    for t in scheduler.timesteps:
        out = model_fn(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x).prev_sample
        assert x.dtype == F64
    return x.numpy()
