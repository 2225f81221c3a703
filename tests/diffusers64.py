"""diffusers' schedulers in float64, for parity tests at 1e-10.

diffusers (0.42.1, pinned in the `test` extra) builds its betas, ᾱ and sigmas in
float32 and casts the sample to float32 inside `step`, so its stock results differ
from exact arithmetic by 1e-7–1e-6. Here each float32 cast in the code paths we
compare with is replaced by float64 in the installed source of the method
(`inspect.getsource` → `str.replace` → `exec` in the defining module's globals), and
each replacement asserts how often it occurs, so that a change in diffusers fails
loudly rather than leaving a float32 cast in place. Everything else is diffusers'
own code.
"""

import inspect
import sys
import textwrap

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)


F64 = torch.float64


def _patched(func, replacements, glb):
    src = textwrap.dedent(inspect.getsource(func))
    for old, new, count in replacements:
        found = src.count(old)
        assert found == count, f"{func.__qualname__}: {count}× {old!r} expected, {found}"
        src = src.replace(old, new)
    namespace = {}
    exec(compile(src, f"<float64 {func.__qualname__}>", "exec"), glb, namespace)
    return namespace[func.__name__]


def _globals_with_f64_betas(cls):
    module = sys.modules[cls.__module__]
    glb = dict(module.__dict__)
    glb["betas_for_alpha_bar"] = _patched(
        module.betas_for_alpha_bar,
        [("torch.tensor(betas, dtype=torch.float32)", "torch.tensor(betas, dtype=torch.float64)", 1)],
        glb,
    )
    return glb


def _ddim():
    glb = _globals_with_f64_betas(DDIMScheduler)
    init = _patched(
        DDIMScheduler.__init__,
        [
            ("dtype=torch.float32", "dtype=torch.float64", 3),
            ("torch.tensor(1.0)", "torch.tensor(1.0, dtype=torch.float64)", 1),
        ],
        glb,
    )
    return type("DDIMScheduler64", (DDIMScheduler,), {"__init__": init})


def _ddpm():
    glb = _globals_with_f64_betas(DDPMScheduler)
    init = _patched(
        DDPMScheduler.__init__,
        [
            ("dtype=torch.float32", "dtype=torch.float64", 3),
            ("torch.linspace(-6, 6, num_train_timesteps)",
             "torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float64)", 1),
            ("self.one = torch.tensor(1.0)", "self.one = torch.tensor(1.0, dtype=torch.float64)", 1),
        ],
        glb,
    )
    return type("DDPMScheduler64", (DDPMScheduler,), {"__init__": init})


def _dpm():
    cls = DPMSolverMultistepScheduler
    glb = _globals_with_f64_betas(cls)
    init = _patched(cls.__init__, [("dtype=torch.float32", "dtype=torch.float64", 3)], glb)
    set_timesteps = _patched(
        cls.set_timesteps,
        [("sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)",
          "sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float64)", 1)],
        glb,
    )
    step = _patched(
        cls.step,
        [
            ("sample = sample.to(torch.float32)", "sample = sample.to(torch.float64)", 1),
            ("dtype=torch.float32", "dtype=torch.float64", 2),
        ],
        glb,
    )
    return type("DPMSolverMultistepScheduler64", (cls,),
                {"__init__": init, "set_timesteps": set_timesteps, "step": step})


def _flow():
    cls = FlowMatchEulerDiscreteScheduler
    glb = dict(sys.modules[cls.__module__].__dict__)
    init = _patched(
        cls.__init__,
        [("dtype=np.float32", "dtype=np.float64", 1),
         ("to(dtype=torch.float32)", "to(dtype=torch.float64)", 1)],
        glb,
    )
    set_timesteps = _patched(
        cls.set_timesteps,
        [
            (".astype(np.float32)", ".astype(np.float64)", 2),
            ("dtype=torch.float32, device=device", "dtype=torch.float64, device=device", 2),
            ("torch.zeros(1, device=sigmas.device)",
             "torch.zeros(1, device=sigmas.device, dtype=sigmas.dtype)", 1),
            ("torch.ones(1, device=sigmas.device)",
             "torch.ones(1, device=sigmas.device, dtype=sigmas.dtype)", 1),
        ],
        glb,
    )
    step = _patched(cls.step, [("sample = sample.to(torch.float32)",
                                "sample = sample.to(torch.float64)", 1)], glb)
    return type("FlowMatchEulerDiscreteScheduler64", (cls,),
                {"__init__": init, "set_timesteps": set_timesteps, "step": step})


DDIM64, DDPM64, DPM64, FLOW64 = _ddim(), _ddpm(), _dpm(), _flow()


def run_vp(scheduler, eps_fn, x_T, noise=None, **step_kw):
    """diffusers' sampling loop: `eps_fn(x, timestep)` with the integer timestep;
    `noise[i]` is step i's `variance_noise` (DDIM η > 0, DPM SDE variants)."""
    x = torch.as_tensor(np.asarray(x_T), dtype=F64)
    for i, t in enumerate(scheduler.timesteps):
        kw = dict(step_kw)
        if noise is not None:
            kw["variance_noise"] = torch.as_tensor(np.asarray(noise[i]), dtype=F64)
        x = scheduler.step(eps_fn(x, int(t)), t, x, **kw).prev_sample
        assert x.dtype == F64
    return x.numpy()


def run_flow(scheduler, velocity_fn, x_T):
    """diffusers' flow-matching loop: `velocity_fn(x, timestep)` with the float
    timestep 1000 σ."""
    x = torch.as_tensor(np.asarray(x_T), dtype=F64)
    for t in scheduler.timesteps:
        x = scheduler.step(velocity_fn(x, t), t, x).prev_sample
        assert x.dtype == F64
    return x.numpy()
