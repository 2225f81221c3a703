"""diffusers' `CogVideoXDDIMScheduler` in float64 (see `tests/diffusers64.py`), the
loops that drive the DDIM-family schedulers with given noises, and the shared setup
of tests/test_diffusers_ddim*.py: Gaussian data N(μ, s²), whose exact ε, x̂_0 and v
are closed form, on both sides (the data's spread, μ = 0.7, s = 0.9, puts x̂_0
outside [−1, 1] at many steps, so clipping and thresholding are active)."""

import jax.numpy as jnp
import numpy as np
import torch
from diffusers import CogVideoXDDIMScheduler

import adjoint_jax as aj

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


MU, S = 0.7, 0.9
TOL = 1e-10
SHAPE = (2, 3, 4)  # batch, channels, pixels (diffusers' thresholding needs ≥ 3 axes)
X_T = np.random.default_rng(0).standard_normal(SHAPE)
NOISE = np.random.default_rng(1).standard_normal((64,) + SHAPE)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def gaussian_output(kind, ab, x, mu):
    """The exact network output (`prediction_type` kind) at ᾱ = ab for data
    N(mu, S²): works on torch tensors and JAX arrays alike."""
    a, sig = ab**0.5, (1 - ab) ** 0.5
    d = a * a * S * S + sig * sig
    eps = sig * (x - a * mu) / d
    x0 = mu + a * S * S * (x - a * mu) / d
    return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - sig * x0}[kind]


def torch_model(sched, kind, mu=MU):
    ab = sched.alphas_cumprod.to(torch.float64)
    return lambda x, n: gaussian_output(kind, ab[n], x, mu)


def jax_model(sched, kind):
    """The network as the pipeline calls it: `model(params, x, timestep, cond)`,
    timestep an integer array, params = μ."""
    ab = jnp.asarray(sched.alphas_cumprod.numpy())

    def f(params, x, n, cond):
        del cond
        assert jnp.issubdtype(n.dtype, jnp.integer)
        return gaussian_output(kind, ab[n], x, params)

    return f


def config_of(sched):
    return dict(sched.config) | {"_class_name": type(sched).__mro__[1].__name__}


def run_ours(setup, noise=None, x_T=X_T, mu=MU):
    return np.asarray(
        aj.sample(
            setup.model,
            jnp.asarray(mu),
            jnp.asarray(x_T),
            schedule=setup.schedule,
            ts=setup.ts,
            sampler=setup.sampler,
            noise=noise,
        )
    )
