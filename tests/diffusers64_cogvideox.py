"""diffusers' `CogVideoXDPMScheduler` in float64 (the class of
`tests/diffusers64_pipelines.py`) and the CogVideoX pipeline's loop around it, fed
given normals: `step` draws them with `randn_tensor`, one on its first-order steps
and two (keeping the second) on the others."""

import contextlib

import numpy as np
import torch

from .diffusers64 import F64
from .diffusers64_pipelines import COGVIDEOX_DPM64


@contextlib.contextmanager
def fed_normals(draws):
    """`randn_tensor` in the scheduler module returns draws[0], draws[1], … in
    turn; yields the list of the indices handed out."""
    glb = COGVIDEOX_DPM64.step.__globals__
    bank = iter(range(len(draws)))
    handed = []

    def randn(shape, generator=None, device=None, dtype=None, **kw):
        k = next(bank)
        handed.append(k)
        return torch.as_tensor(np.asarray(draws[k]), dtype=dtype).reshape(shape)

    original = glb["randn_tensor"]
    glb["randn_tensor"] = randn
    try:
        yield handed
    finally:
        glb["randn_tensor"] = original


def run_cogvideox_dpm(sched, model_fn, x_T, draws):
    """The loop of diffusers' `CogVideoXPipeline` with `CogVideoXDPMScheduler`:
    `model_fn(latents, timestep)` (torch), the old x̂_0 that `step` returns passed
    back with `timesteps[i − 1]`. Returns (final latents, number of draws)."""
    x = x_T if torch.is_tensor(x_T) else torch.as_tensor(np.asarray(x_T), dtype=F64)
    steps = sched.timesteps
    old_x0 = None
    with fed_normals(draws) as handed:
        for i, t in enumerate(steps):
            out = model_fn(sched.scale_model_input(x, t), int(t))
            x, old_x0 = sched.step(
                out, old_x0, t, steps[i - 1] if i > 0 else None, x, eta=0.0,
                return_dict=False,
            )
            assert x.dtype == F64, x.dtype
    return x, len(handed)


def draws_for(noise, used, total):
    """diffusers' `total` draws with noise[i] at position used[i] (the draws it
    throws away get fresh normals, which must not matter)."""
    rest = np.random.default_rng(7).standard_normal((total,) + noise.shape[1:])
    rest[used] = noise[: len(used)]
    return rest
