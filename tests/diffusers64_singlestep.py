"""diffusers' `DPMSolverSinglestepScheduler`, `DEISMultistepScheduler` and
`DPMSolverSDEScheduler` in float64 (see `tests/diffusers64.py`: each float32 cast on
the compared code paths replaced in the installed source, each replacement counted).

`DPMSolverSDEScheduler`'s module imports `torchsde` (its Brownian tree) at import
time; where torchsde is not installed a stand-in module lets it import, and the tests
replace the scheduler's noise sampler with one fed known normals (so the tree is
never built). `HAS_TORCHSDE` says whether the real tree is available.
"""

import importlib
import importlib.util
import sys
import types

import numpy as np
import torch
from diffusers import DEISMultistepScheduler, DPMSolverSinglestepScheduler

from .diffusers64 import F64, _globals_with_f64_betas, _patched


HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None


def _sde_class():
    if not HAS_TORCHSDE and "torchsde" not in sys.modules:
        stub = types.ModuleType("torchsde")

        def _missing(*args, **kwargs):
            raise ImportError("torchsde is not installed (a stand-in for the tests)")

        stub.BrownianInterval = _missing
        sys.modules["torchsde"] = stub
    module = importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_sde")
    return module.DPMSolverSDEScheduler


def _f64_init(cls):
    glb = _globals_with_f64_betas(cls)
    return glb, _patched(cls.__init__, [("dtype=torch.float32", "dtype=torch.float64", 3)], glb)


def _singlestep():
    cls = DPMSolverSinglestepScheduler
    glb, init = _f64_init(cls)
    set_timesteps = _patched(
        cls.set_timesteps,
        [("sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)",
          "sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float64)", 1)],
        glb,
    )
    return type("DPMSolverSinglestepScheduler64", (cls,),
                {"__init__": init, "set_timesteps": set_timesteps})


def _deis():
    cls = DEISMultistepScheduler
    glb, init = _f64_init(cls)
    set_timesteps = _patched(
        cls.set_timesteps, [(".astype(np.float32)", ".astype(np.float64)", 5)], glb
    )
    return type("DEISMultistepScheduler64", (cls,),
                {"__init__": init, "set_timesteps": set_timesteps})


def _sde():
    cls = _sde_class()
    glb, init = _f64_init(cls)
    set_timesteps = _patched(
        cls.set_timesteps,
        [("sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)",
          "sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float64)", 1)],
        glb,
    )
    return type("DPMSolverSDEScheduler64", (cls,),
                {"__init__": init, "set_timesteps": set_timesteps})


SINGLESTEP64, DEIS64, SDE64 = _singlestep(), _deis(), _sde()


def run(scheduler, model_fn, x_T, noise=None):
    """diffusers' loop: `model_fn(scaled x, timestep)` with the scheduler's own
    timestep (a 0-d tensor); x_T is the standard-normal draw, scaled by
    `init_noise_sigma`. `noise[i]` is the i-th normal `randn_tensor` returns inside
    `step` (DPMSolverSinglestep's sde-dpmsolver++)."""
    import diffusers.schedulers.scheduling_dpmsolver_singlestep as mod

    x = torch.as_tensor(np.asarray(x_T), dtype=F64) * scheduler.init_noise_sigma
    bank = None if noise is None else iter(torch.as_tensor(np.asarray(noise), dtype=F64))
    original = mod.randn_tensor
    if bank is not None:
        mod.randn_tensor = lambda shape, generator=None, device=None, dtype=None: next(bank)
    try:
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t)
            x = scheduler.step(model_fn(inp, t), t, x).prev_sample
            assert x.dtype == F64
    finally:
        mod.randn_tensor = original
    return x.numpy()


class BrownianNormals:
    """A stand-in for `DPMSolverSDEScheduler`'s Brownian-tree noise sampler: Brownian
    motion W on the scheduler's σ grid (its steps' σ and their log-midpoints, `grid`,
    decreasing) whose increments over the grid's intervals are √Δ · `normals[k]`;
    `sampler(σ, σ_next)` returns (W(σ_next) − W(σ))/√|σ_next − σ|, as diffusers'
    `BrownianTreeNoiseSampler` does (the σ it is called with are matched to the grid
    to 1e-12 relative)."""

    def __init__(self, grid, normals):
        self.grid = np.asarray(grid, np.float64)
        steps = np.sqrt(-np.diff(self.grid))[:, None] * np.asarray(normals).reshape(
            len(self.grid) - 1, -1
        )
        self.w = np.concatenate([np.zeros((1, steps.shape[1])), np.cumsum(steps, 0)])
        self.shape = np.asarray(normals).shape[1:]
        self.calls = 0

    def _index(self, sigma):
        sigma = float(sigma)
        k = int(np.argmin(np.abs(self.grid - sigma)))
        assert abs(self.grid[k] - sigma) <= 1e-12 * sigma, (sigma, self.grid[k])
        return k

    def __call__(self, sigma, sigma_next):
        self.calls += 1
        a, b = self._index(sigma), self._index(sigma_next)
        dw = (self.w[b] - self.w[a]).reshape(self.shape)
        return torch.as_tensor(dw / np.sqrt(abs(self.grid[b] - self.grid[a])), dtype=F64)
