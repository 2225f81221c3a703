"""The analytic network of `benchmarks/pipelines.py`, the same function on both
sides (diffusers' loop in torch, `aj.sample` in JAX), and the normals fed to
diffusers' draws: data N(μ, s²) elementwise, so the exact ε, v, x̂_0 or velocity is
closed form at the noise level the network reads from its timestep."""

import contextlib
import math

import jax.numpy as jnp
import numpy as np
import torch


MU, S = 0.7, 0.5
F64 = torch.float64
Z = np.random.default_rng(0).standard_normal((2, 3, 2))
NOISE = np.random.default_rng(1).standard_normal((256, 2, 3, 2))


# ---- the network, the same function on both sides ------------------------------------

def _posterior(a, s, x):
    """E[ε | x], E[x_0 | x] for x = a x_0 + s ε, x_0 ~ N(μ, s²) elementwise."""
    d = a * a * S * S + s * s
    eps = s * (x - a * MU) / d
    return eps, MU + a * S * S * (x - a * MU) / d


def _output(kind, pred, level, x, xp, sigma_data=0.5):
    """The network's output at input `x` and noise level `level` (VP: log σ; flow: σ;
    EDM: σ) for `pred` (the config's prediction_type). `xp` is `math` or jax.numpy
    (`math` on diffusers' side: the noise level is a Python float there)."""
    if kind in ("vp", "flow"):
        if kind == "vp":
            ab = 1 / (1 + xp.exp(2 * level))
            a, s = xp.sqrt(ab), xp.sqrt(1 - ab)
        else:  # x = (1 − σ) x_0 + σ ε; velocity u = ε − x_0
            a, s = 1 - level, level
        eps, x0 = _posterior(a, s, x)
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0,
                "flow_prediction": eps - x0, "flow": eps - x0}[pred]
    # EDM: the input is c_in · x; the output F with x̂_0 = c_skip x + c_out F.
    sd2 = sigma_data * sigma_data
    x = x * xp.sqrt(level * level + sd2)
    _, x0 = _posterior(1.0, level, x)
    c_skip = sd2 / (level * level + sd2)
    c_out = level * sigma_data / xp.sqrt(level * level + sd2)
    return (x0 - c_skip * x) / (c_out if pred == "epsilon" else -c_out)


def _level_np(kind, table, tau, T):
    if kind == "vp":
        lo = int(np.clip(np.floor(tau), 0, len(table) - 1))
        w = tau - lo
        if w == 0:
            return table[lo]
        return (1 - w) * table[lo] + w * table[min(lo + 1, len(table) - 1)]
    if kind == "flow":
        return tau / T
    return 4 * tau if kind == "vpc" else np.exp(4 * tau)


def _level_jnp(kind, table, tau, T):
    if kind == "vp":
        lo = jnp.clip(jnp.floor(tau), 0, table.shape[0] - 1)
        i = lo.astype(jnp.int32)
        w = tau - lo
        j = jnp.minimum(i + 1, table.shape[0] - 1)
        return jnp.where(w == 0, table[i], (1 - w) * table[i] + w * table[j])
    if kind == "flow":
        return tau / T
    return 4 * tau if kind == "vpc" else jnp.exp(4 * tau)


class Network:
    """The analytic network of a scheduler: `torch(x_in, t)` for diffusers' loop,
    `jax(params, x_in, timestep, cond)` for `aj.from_diffusers` (params: the log σ
    table of a VP scheduler, else None). A learned variance (DDPM/DPM-Solver
    `variance_type` 'learned'/'learned_range') comes as channels of zeros after the
    prediction, on both sides."""

    def __init__(self, sched, class_name):
        cfg = sched.config
        self.T = float(cfg.get("num_train_timesteps", 1000))
        self.sigma_data = float(cfg.get("sigma_data", 0.5))
        self.learned_variance = cfg.get("variance_type") in ("learned", "learned_range")
        self.table = None
        if class_name.startswith("FlowMatch"):
            self.kind, self.pred = "flow", "flow"
        elif cfg.get("use_flow_sigmas"):
            self.kind, self.pred = "flow", cfg.prediction_type
        elif class_name.startswith("EDM"):
            self.kind, self.pred = "edm", cfg.prediction_type
        else:
            ab = sched.alphas_cumprod.to(F64).numpy()
            with np.errstate(divide="ignore"):
                self.table = 0.5 * (np.log1p(-ab) - np.log(ab))
            self.pred = cfg.prediction_type
            # Continuous timesteps (Euler's timestep_type) are 0.25 log σ.
            self.kind = "vpc" if cfg.get("timestep_type") == "continuous" else "vp"

    @property
    def params(self):
        return None if self.table is None else jnp.asarray(self.table)

    def torch(self, x, t):
        level = float(_level_np(self.kind, self.table, float(t), self.T))
        out = _output(self.kind, self.pred, level, x, math, self.sigma_data)
        if self.learned_variance:  # the UNet's variance channels: v = 0 (frac 1/2)
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        return out

    def jax(self, params, x, timestep, cond):
        del cond
        tau = jnp.asarray(timestep).astype(x.dtype)
        level = _level_jnp(self.kind, params, tau, self.T)
        out = _output(self.kind, self.pred, level, x, jnp, self.sigma_data)
        if self.learned_variance:
            out = jnp.concatenate([out, jnp.zeros_like(out)], axis=1)
        return out


# ---- the normals diffusers draws ----------------------------------------------------

@contextlib.contextmanager
def fed_normals(sched, normals):
    """`randn_tensor` in the namespace of the scheduler's `step` returns
    `normals[0]`, `normals[1]`, … in turn; yields the list of draws."""
    glb = type(sched).step.__globals__
    bank = iter(np.asarray(normals))
    drawn = []

    def randn(shape, generator=None, device=None, dtype=None, **kw):
        drawn.append(None)
        return torch.as_tensor(next(bank), dtype=F64).reshape(shape)

    had, original = "randn_tensor" in glb, glb.get("randn_tensor")
    glb["randn_tensor"] = randn
    try:
        yield drawn
    finally:
        if had:
            glb["randn_tensor"] = original
        else:
            del glb["randn_tensor"]


class _NoDraws:
    calls = 0

    def __call__(self, sigma, sigma_next):
        raise AssertionError("DPMSolverSDEScheduler drew noise on a one-step grid")


def brownian_normals(sched):
    """DPMSolverSDEScheduler draws from a Brownian tree (torchsde) at its steps' σ and
    their log-midpoints; it is given the Brownian motion on that grid whose
    normalised increments are NOISE[0], NOISE[1], … (`aj`'s noise[i] for grid
    interval i; `tests/diffusers64_singlestep.BrownianNormals`)."""
    from tests.diffusers64_singlestep import BrownianNormals

    sig = sched.sigmas.numpy()
    steps = np.concatenate([sig[:1], sig[2:-1:2]])
    t = -np.log(steps)
    if len(steps) < 2:  # one step, to σ = 0: no noise is drawn
        return _NoDraws()
    grid = np.empty(2 * len(steps) - 1)
    grid[0::2], grid[1::2] = steps, np.exp(-(t[:-1] + (t[1:] - t[:-1]) * 0.5))
    return BrownianNormals(grid, NOISE[: len(grid) - 1])
