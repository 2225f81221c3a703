"""diffusers' k-diffusion (σ-space) schedulers in float64, for parity tests at 1e-10:
Euler, Euler a, Heun, FlowMatchHeun, KDPM2, KDPM2 a and LMS; and the harness the
`test_diffusers_euler*.py` files share (`compare`: the pipeline's loop against
`aj.sample` on `aj.from_diffusers`' setup, with an analytic network).

As in `tests/diffusers64.py` (whose `_patched` does the work), every float32 in the
methods we compare with becomes float64 (each replacement asserts its count), and
the few tensors built with torch's default dtype get float64 explicitly. The noise
a scheduler draws inside `step` comes from `noise_bank` (its module's
`randn_tensor`, replaced in the patched methods' globals only).
"""

import contextlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
)

import adjoint_jax as aj

from .diffusers64 import F64, _patched


def _float64(cls, methods, extra=()):
    """A subclass of `cls` with `methods` (name → number of 'float32' in it)
    re-compiled in float64; `extra` adds (method, old, new, count) replacements."""
    module = sys.modules[cls.__module__]
    glb = dict(module.__dict__)
    if hasattr(module, "betas_for_alpha_bar"):
        glb["betas_for_alpha_bar"] = _patched(
            module.betas_for_alpha_bar,
            [("dtype=torch.float32", "dtype=torch.float64", 1)],
            glb,
        )
    body = {"_glb": glb}
    for name, count in methods.items():
        reps = [("float32", "float64", count)]
        reps += [(old, new, c) for m, old, new, c in extra if m == name]
        body[name] = _patched(getattr(cls, name), reps, glb)
    return type(cls.__name__ + "64", (cls,), body)


EULER64 = _float64(
    EulerDiscreteScheduler,
    {"__init__": 4, "set_timesteps": 8, "step": 1},
    [
        (
            "set_timesteps",
            "torch.Tensor([0.25 * sigma.log() for sigma in sigmas[:-1]])",
            "torch.stack([0.25 * sigma.log() for sigma in sigmas[:-1]])",
            1,
        ),
        (
            "set_timesteps",
            "num_inference_steps + 1).exp()",
            "num_inference_steps + 1, dtype=torch.float64).exp()",
            1,
        ),
        (
            "__init__",
            "torch.Tensor([0.25 * sigma.log() for sigma in sigmas])",
            "torch.stack([0.25 * sigma.log() for sigma in sigmas])",
            1,
        ),
    ],
)
EULER_A64 = _float64(
    EulerAncestralDiscreteScheduler, {"__init__": 4, "set_timesteps": 4, "step": 1}
)
HEUN64 = _float64(HeunDiscreteScheduler, {"__init__": 3, "set_timesteps": 6})
FLOW_HEUN64 = _float64(
    FlowMatchHeunDiscreteScheduler, {"__init__": 2, "set_timesteps": 1, "step": 1}
)
KDPM2_64 = _float64(KDPM2DiscreteScheduler, {"__init__": 3, "set_timesteps": 4})
KDPM2A64 = _float64(
    KDPM2AncestralDiscreteScheduler, {"__init__": 3, "set_timesteps": 5, "step": 0}
)
LMS64 = _float64(LMSDiscreteScheduler, {"__init__": 4, "set_timesteps": 5})


@contextlib.contextmanager
def noise_bank(scheduler, noises):
    """`randn_tensor` inside the scheduler's patched methods returns `noises[k]` at
    its k-th call; yields a list that records how many were drawn."""
    glb = type(scheduler)._glb
    bank = iter(np.asarray(noises))
    drawn = []

    def randn(shape, generator=None, device=None, dtype=None, **kw):
        drawn.append(None)
        return torch.as_tensor(next(bank), dtype=F64).reshape(shape)

    original = glb.get("randn_tensor")
    glb["randn_tensor"] = randn
    try:
        yield drawn
    finally:
        glb["randn_tensor"] = original


def run_pipeline(scheduler, model_fn, z, noises=None, **step_kw):
    """A diffusers pipeline's loop in float64: latents = z · init_noise_sigma, then for
    each timestep t: out = model_fn(scale_model_input(latents, t), t), latents =
    step(out, t, latents). `model_fn(x, timestep)` gets the timestep as a float64
    tensor. Returns (final latents, the timesteps the network saw, noises drawn)."""
    latents = torch.as_tensor(np.asarray(z), dtype=F64) * getattr(
        scheduler, "init_noise_sigma", 1.0
    )
    seen = []
    bank = noise_bank(scheduler, noises if noises is not None else np.zeros((0,)))
    with bank as drawn:
        for t in scheduler.timesteps:
            scale = getattr(scheduler, "scale_model_input", None)  # (flow: none)
            inp = latents if scale is None else scale(latents, t)
            tt = torch.as_tensor(t, dtype=F64)
            seen.append(float(tt))
            latents = scheduler.step(
                model_fn(inp, tt), t, latents, **step_kw
            ).prev_sample
            assert latents.dtype == F64, latents.dtype
    return latents.numpy(), np.asarray(seen), len(drawn)


# ---- the parity harness --------------------------------------------------------------
MU, S = 0.7, 0.5
TOL = 1e-10
Z = np.random.default_rng(0).standard_normal((2, 3))
NOISE = np.random.default_rng(1).standard_normal((64, 2, 3))
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
NS = (7, 20)  # the step counts of most cases (below 15, where lower_order_final acts)
MAX_DIFF: dict[str, float] = {}


def gaussian(ab, x, kind, mu=MU):
    """The exact ε, x̂_0, v or flow velocity of N(μ, s²) data at ᾱ, for
    x = √ᾱ x_0 + √(1 − ᾱ) ε."""
    a, sig = ab**0.5, (1 - ab) ** 0.5
    d = a * a * S * S + sig * sig
    eps = sig * (x - a * mu) / d
    x0 = mu + a * S * S * (x - a * mu) / d
    return {
        "epsilon": eps,
        "sample": x0,
        "v_prediction": a * eps - sig * x0,
        "flow": eps - x0,
    }[kind]


def log_table(sched):
    ab = sched.alphas_cumprod.numpy()
    return np.log(np.sqrt((1 - ab) / ab))


def torch_model(sched, kind, continuous=False):
    logs = log_table(sched)

    def f(x, tau):
        tau = float(tau)
        s = (
            np.exp(4 * tau)
            if continuous
            else np.exp(np.interp(tau, np.arange(len(logs)), logs))
        )
        return gaussian(1 / (1 + s * s), x, kind)

    return f


def jax_model(kind, continuous=False):
    """`model(params, x, timestep, cond)` with params = the log σ table."""

    def f(logs, x, tau, cond):
        del cond
        if continuous:
            s = jnp.exp(4 * tau)
        else:
            s = jnp.exp(
                jnp.interp(tau, jnp.arange(logs.shape[0], dtype=tau.dtype), logs)
            )
        return gaussian(1 / (1 + s * s), x, kind)

    return f


def config_of(sched):
    return dict(sched.config) | {"_class_name": type(sched).__mro__[1].__name__}


def net_timesteps(setup, times):
    """The timesteps `setup.model` gives its network at `times`."""
    net = setup.model.model
    return np.asarray(
        jax.vmap(lambda t: net.timestep(net.schedule, t))(jnp.asarray(times))
    )


def agree(check, ours, ref, atol=TOL):
    diff = float(np.max(np.abs(np.asarray(ours) - np.asarray(ref))))
    MAX_DIFF[check] = max(MAX_DIFF.get(check, 0.0), diff)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)


def compare(
    check,
    sched,
    n,
    *,
    kind=None,
    continuous=False,
    noise=False,
    sigmas=None,
    timesteps=None,
    step_kw=None,
    sampler=None,
    eval_times=None,
):
    """Runs the pipeline and `aj.sample` on `from_diffusers`' setup (its sampler
    replaced by `sampler`, if given); asserts they agree and that the network saw the
    same timesteps. With `noise`, step i's normal is NOISE[i] on both sides (for
    `aj.EulerChurn` diffusers draws only on its churning steps). Returns (setup, the
    timesteps the pipeline's network saw, the number of normals it drew)."""
    kind = kind or sched.config.prediction_type
    if sigmas is not None:
        sched.set_timesteps(sigmas=sigmas)
    elif timesteps is not None:
        sched.set_timesteps(timesteps=timesteps)
    else:
        sched.set_timesteps(n)
    setup = aj.from_diffusers(
        config_of(sched),
        n,
        model=jax_model(kind, continuous),
        sigmas=sigmas,
        timesteps=timesteps,
    )
    if sampler is not None:
        setup = setup._replace(sampler=sampler)
    steps = len(setup.ts) - 1
    bank = None
    if noise:
        draws = getattr(setup.sampler, "churn_steps", None)
        bank = NOISE if draws is None else NOISE[draws(setup.schedule, setup.ts)]
    ref, seen, drawn = run_pipeline(
        sched, torch_model(sched, kind, continuous), Z, bank, **(step_kw or {})
    )
    x = aj.sample(
        setup.model,
        jnp.asarray(log_table(sched)),
        setup.initial(jnp.asarray(Z)),
        schedule=setup.schedule,
        ts=setup.ts,
        sampler=setup.sampler,
        noise=jnp.asarray(NOISE[:steps]) if noise else None,
    )
    agree(check, setup.final(x), ref)
    # The network's timesteps: at the grid's points (one evaluation per step), or
    # where `eval_times(setup, seen)` says (→ (times, the timesteps seen there)).
    times, expected = (
        (setup.ts[: len(seen)], seen)
        if eval_times is None
        else (eval_times(setup, seen))
    )
    np.testing.assert_allclose(net_timesteps(setup, times), expected, rtol=0, atol=1e-9)
    return setup, seen, drawn


def heun_points(setup, seen):
    """Heun-type loops see t₀, t₁, t₁, …: each grid point but the last, once."""
    return setup.ts[:-1], np.concatenate([seen[:1], seen[1::2]])


def kdpm2_points(setup, seen):
    """KDPM2 loops see t₀, u₀, t₁, u₁, …, t_(N−1): the grid points but the last, and
    between them the log-SNR midpoints (the ancestral one's: the next point)."""
    ts, sch = setup.ts, setup.schedule
    if isinstance(setup.sampler, aj.KDPM2Ancestral):
        mids = ts[1:-1]
    else:
        mids = sch.t_of_lam(0.5 * (sch.lam(ts[:-2]) + sch.lam(ts[1:-1])))
    times = jnp.stack([ts[:-2], mids], 1).reshape(-1)
    return jnp.concatenate([times, ts[-2:-1]]), seen
