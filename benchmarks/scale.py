"""Scale: the gradient strategies on a latent-diffusion-sized problem.

Claim checked: on a model of Stable-Diffusion shape, with classifier-free guidance, a
VAE-like decoder before the loss, a LoRA-only gradient and bfloat16 weights, every
strategy runs, the memory-flat ones stay flat in N, and gradient / sampling time (R)
stays near the cost floor (≈ 3 for the memory-flat strategies).

The problem (random weights; only the shapes and costs matter):

- **ε-network**: a UNet of Stable-Diffusion shape in NHWC: a sinusoidal time
  embedding and its MLP; three resolutions (32², 16², 8² at the default size) with
  residual blocks (GroupNorm, SiLU, 3×3 convolutions, the time embedding added per
  channel), strided-convolution down-sampling and nearest-neighbour up-sampling with
  skip connections; at the two lower resolutions and in the middle a transformer
  block (self-attention, cross-attention to the conditioning tokens, GELU
  feed-forward).
- **Conditioning**: 8 tokens of width 64 (a prompt's embedding), guided with
  `aj.cfg(model, 7.5, null_tokens)` (both branches in one batched call).
- **LoRA**: rank-4 adapters on every attention projection (q, k, v, out, self and
  cross). The gradient is taken with respect to the adapters only; the base weights
  are closed over (a traced closure: they are an argument of the jitted function).
  The adapters are float32; the base weights are float32 or bfloat16
  (`--dtypes`), and the network computes in the base weights' dtype (attention
  softmax in float32), returning ε in the sampler state's dtype (float32).
- **Loss**: a small convolutional decoder from latents to pixels (two ×2 up-samplings:
  32×32×4 → 128×128×3), under `jax.checkpoint`, then the mean squared distance to a
  fixed image.
- **Latents**: 32×32×4 at batch 4, 32 base channels (`--size`, `--batch`, `--channels`
  for larger).

Strategies (one registry: the strings are parsed by `adjoint_jax.bench._registry`):
`DTO()`, `DTO(checkpoints="steps")`, `DTO(checkpoints=k)` and `Truncated(last=1)`
with `DPMSolverPP()` (diffusers' default scheduler), `AdjointDEIS(order=2)` after
`DPMSolverPP()`, and `ReversibleAdjoint()` with `AsyncLeapfrog()` (the most accurate
reversible sampler at few steps; README, "Which strategy").

Measured for each (dtype, N, strategy): sampling time (the jitted loss without a
gradient: sampling, decoding and loss), gradient time (the jitted gradient with
respect to the adapters), R = gradient / sampling time, XLA's compiled temporary
memory of the gradient, and peak memory while the gradient runs (CPU: the rise of
the process's peak resident set over its size before the call, the peak reset
through `/proc/self/clear_refs`; GPU: `peak_bytes_in_use` of the device, each
configuration in its own process). Times are medians after a warm-up run: of
`--repeats` runs for the gradients, and of at least 3 for sampling (one sampling time
per sampler and N is the denominator of every R in its row group; a single timed run
of it was off by up to 30%).

Run (11 minutes on a 2-core CPU at the default size, quiet, 17 with another job
running; half of it is the compilation of 24 gradients of a large graph):

    python benchmarks/scale.py --out docs/scale

`--tiny` runs every strategy on a very small network (a smoke test; the test suite
runs it). Output in `--out`: `scale.md` (the table) and `scale.json`.
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import adjoint_jax as aj
from adjoint_jax.bench._registry import parse


# ---- the network ------------------------------------------------------------------
def _normal(key, shape, scale):
    return scale * jax.random.normal(key, shape, jnp.float32)


def _conv_p(key, c_in, c_out, k=3, scale=1.0):
    return {
        "w": _normal(key, (k, k, c_in, c_out), scale / math.sqrt(k * k * c_in)),
        "b": jnp.zeros((c_out,), jnp.float32),
    }


def _dense_p(key, d_in, d_out, scale=1.0):
    return {
        "w": _normal(key, (d_in, d_out), scale / math.sqrt(d_in)),
        "b": jnp.zeros((d_out,), jnp.float32),
    }


def _norm_p(c):
    return {"scale": jnp.ones((c,), jnp.float32), "shift": jnp.zeros((c,), jnp.float32)}


def _vec(v, ndim):
    return v.reshape((1,) * (ndim - 1) + (-1,))


def conv(p, x, stride=1):
    w = p["w"].astype(x.dtype)
    y = jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + _vec(p["b"].astype(x.dtype), y.ndim)


def dense(p, x, lora=None):
    y = x @ p["w"].astype(x.dtype) + _vec(p["b"].astype(x.dtype), x.ndim)
    if lora is not None:  # y += (x A) B: the low-rank update of W
        y = y + (x @ lora["a"].astype(x.dtype)) @ lora["b"].astype(x.dtype)
    return y


def group_norm(p, x, groups):
    shape = x.shape
    g = x.reshape(shape[:-1] + (groups, shape[-1] // groups)).astype(jnp.float32)
    axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
    mean = g.mean(axis=axes, keepdims=True)
    var = jnp.mean((g - mean) ** 2, axis=axes, keepdims=True)
    g = ((g - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(shape).astype(x.dtype)
    return g * _vec(p["scale"].astype(x.dtype), x.ndim) + _vec(
        p["shift"].astype(x.dtype), x.ndim
    )


def layer_norm(p, x):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.mean((x32 - mean) ** 2, -1, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + 1e-5)).astype(x.dtype)
    return y * _vec(p["scale"].astype(x.dtype), x.ndim) + _vec(
        p["shift"].astype(x.dtype), x.ndim
    )


def _res_p(key, c_in, c_out, emb_dim):
    k = jax.random.split(key, 4)
    p = {
        "norm1": _norm_p(c_in),
        "conv1": _conv_p(k[0], c_in, c_out),
        "emb": _dense_p(k[1], emb_dim, c_out),
        "norm2": _norm_p(c_out),
        "conv2": _conv_p(k[2], c_out, c_out, scale=0.3),
    }
    if c_in != c_out:
        p["skip"] = _conv_p(k[3], c_in, c_out, k=1)
    return p


def resblock(p, x, emb, groups):
    h = conv(p["conv1"], jax.nn.silu(group_norm(p["norm1"], x, groups)))
    h = h + dense(p["emb"], emb)[:, None, None, :]
    h = conv(p["conv2"], jax.nn.silu(group_norm(p["norm2"], h, groups)))
    return (conv(p["skip"], x) if "skip" in p else x) + h


_ATTN = ("q", "k", "v", "o")


def _attn_p(key, c, ctx_dim):
    k = jax.random.split(key, 4)
    return {
        "q": _dense_p(k[0], c, c),
        "k": _dense_p(k[1], ctx_dim, c),
        "v": _dense_p(k[2], ctx_dim, c),
        "o": _dense_p(k[3], c, c, scale=0.3),
    }


def attention(p, lora, x, ctx, heads):
    # x (B, T, C), ctx (B, S, D): multi-head attention, softmax in float32.
    b, t, c = x.shape
    q = dense(p["q"], x, lora["q"]).reshape(b, t, heads, c // heads)
    k = dense(p["k"], ctx, lora["k"]).reshape(b, ctx.shape[1], heads, c // heads)
    v = dense(p["v"], ctx, lora["v"]).reshape(b, ctx.shape[1], heads, c // heads)
    logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32)
    w = jax.nn.softmax(logits / math.sqrt(c // heads), axis=-1).astype(x.dtype)
    out = jnp.einsum("bhts,bshd->bthd", w, v).reshape(b, t, c)
    return dense(p["o"], out, lora["o"])


def _transformer_p(key, c, ctx_dim):
    k = jax.random.split(key, 6)
    return {
        "norm": _norm_p(c),
        "proj_in": _dense_p(k[0], c, c),
        "ln1": _norm_p(c),
        "self": _attn_p(k[1], c, c),
        "ln2": _norm_p(c),
        "cross": _attn_p(k[2], c, ctx_dim),
        "ln3": _norm_p(c),
        "ff1": _dense_p(k[3], c, 2 * c),
        "ff2": _dense_p(k[4], 2 * c, c, scale=0.3),
        "proj_out": _dense_p(k[5], c, c, scale=0.3),
    }


def _transformer_lora(key, c, ctx_dim, rank):
    def one(k, d_in, d_out):
        ka, kb = jax.random.split(k)
        # B is small but not zero (the usual zero init would make ∂L/∂A exactly zero
        # at the start, and half of the benchmarked gradient trivial).
        return {
            "a": _normal(ka, (d_in, rank), 1.0 / math.sqrt(d_in)),
            "b": _normal(kb, (rank, d_out), 1e-2 / math.sqrt(rank)),
        }

    ks = jax.random.split(key, 8)
    dims = {"q": (c, c), "k": (c, c), "v": (c, c), "o": (c, c)}
    cross = {"q": (c, c), "k": (ctx_dim, c), "v": (ctx_dim, c), "o": (c, c)}
    return {
        "self": {n: one(ks[i], *dims[n]) for i, n in enumerate(_ATTN)},
        "cross": {n: one(ks[4 + i], *cross[n]) for i, n in enumerate(_ATTN)},
    }


def transformer(p, lora, h, ctx, heads, groups):
    b, hh, ww, c = h.shape
    x = dense(p["proj_in"], group_norm(p["norm"], h, groups).reshape(b, -1, c))
    y = layer_norm(p["ln1"], x)
    x = x + attention(p["self"], lora["self"], y, y, heads)
    x = x + attention(p["cross"], lora["cross"], layer_norm(p["ln2"], x), ctx, heads)
    x = x + dense(p["ff2"], jax.nn.gelu(dense(p["ff1"], layer_norm(p["ln3"], x))))
    return h + dense(p["proj_out"], x).reshape(b, hh, ww, c)


class UNetConfig:
    def __init__(
        self, channels=64, latent_channels=4, ctx_dim=64, heads=4, groups=8, levels=3
    ):
        self.c = channels
        self.mults = (1, 2, 2)[:levels]  # channels per resolution: c, 2c, 2c
        self.attn = (False, True, True)[:levels]  # attention below the top resolution
        self.latent_channels = latent_channels
        self.ctx_dim = ctx_dim
        self.heads = heads
        self.groups = groups
        self.emb_dim = 4 * channels


def init_unet(key, cfg: UNetConfig, rank=4):
    """(base parameters, LoRA adapters) of the UNet, as nested dicts (float32)."""
    keys = iter(jax.random.split(key, 64))
    c, chans = cfg.c, [cfg.c * m for m in cfg.mults]
    base = {
        "t1": _dense_p(next(keys), c, cfg.emb_dim),
        "t2": _dense_p(next(keys), cfg.emb_dim, cfg.emb_dim),
        "conv_in": _conv_p(next(keys), cfg.latent_channels, c),
        "down": [],
        "up": [],
    }
    lora = {"down": [], "mid": None, "up": []}
    prev, skips = c, [c]
    for i, ch in enumerate(chans):
        blk = {"res": _res_p(next(keys), prev, ch, cfg.emb_dim)}
        lblk = None
        if cfg.attn[i]:
            blk["attn"] = _transformer_p(next(keys), ch, cfg.ctx_dim)
            lblk = _transformer_lora(next(keys), ch, cfg.ctx_dim, rank)
        if i < len(chans) - 1:
            blk["down"] = _conv_p(next(keys), ch, ch)
        base["down"].append(blk)
        lora["down"].append(lblk)
        prev = ch
        skips.append(ch)
    base["mid"] = {
        "res1": _res_p(next(keys), prev, prev, cfg.emb_dim),
        "attn": _transformer_p(next(keys), prev, cfg.ctx_dim),
        "res2": _res_p(next(keys), prev, prev, cfg.emb_dim),
    }
    lora["mid"] = _transformer_lora(next(keys), prev, cfg.ctx_dim, rank)
    for i, ch in reversed(list(enumerate(chans))):
        skip = skips.pop()
        blk = {"res": _res_p(next(keys), prev + skip, ch, cfg.emb_dim)}
        lblk = None
        if cfg.attn[i]:
            blk["attn"] = _transformer_p(next(keys), ch, cfg.ctx_dim)
            lblk = _transformer_lora(next(keys), ch, cfg.ctx_dim, rank)
        if i > 0:
            blk["up"] = _conv_p(next(keys), ch, ch)
        base["up"].append(blk)
        lora["up"].append(lblk)
        prev = ch
    base["out_norm"] = _norm_p(prev)
    base["conv_out"] = _conv_p(next(keys), prev, cfg.latent_channels, scale=0.1)
    return base, lora


def unet(cfg: UNetConfig, base, lora, x, t, ctx):
    """ε(x, t, ctx): x (B, H, W, 4) latents, t a scalar time in [0, 1], ctx (S, D) or
    (B, S, D) tokens. Computes in the base weights' dtype; returns x's dtype."""
    dtype = base["conv_in"]["w"].dtype
    x_dtype = x.dtype
    h = x.astype(dtype)
    b = h.shape[0]
    ctx = jnp.broadcast_to(ctx.astype(dtype), (b,) + ctx.shape[-2:])
    # Sinusoidal embedding of 1000 t (as a discrete-time model's timestep).
    half = cfg.c // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    arg = 1000.0 * jnp.asarray(t, jnp.float32) * jnp.asarray(freqs, jnp.float32)
    emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])[None, :].astype(dtype)
    emb = dense(base["t2"], jax.nn.silu(dense(base["t1"], emb)))
    emb = jax.nn.silu(jnp.broadcast_to(emb, (b, emb.shape[-1])))
    g, heads = cfg.groups, cfg.heads

    h = conv(base["conv_in"], h)
    skips = [h]
    for blk, lblk in zip(base["down"], lora["down"]):
        h = resblock(blk["res"], h, emb, g)
        if "attn" in blk:
            h = transformer(blk["attn"], lblk, h, ctx, heads, g)
        skips.append(h)
        if "down" in blk:
            h = conv(blk["down"], h, stride=2)
    h = resblock(base["mid"]["res1"], h, emb, g)
    h = transformer(base["mid"]["attn"], lora["mid"], h, ctx, heads, g)
    h = resblock(base["mid"]["res2"], h, emb, g)
    for blk, lblk in zip(base["up"], lora["up"]):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = resblock(blk["res"], h, emb, g)
        if "attn" in blk:
            h = transformer(blk["attn"], lblk, h, ctx, heads, g)
        if "up" in blk:
            h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
            h = conv(blk["up"], h)
    h = conv(base["conv_out"], jax.nn.silu(group_norm(base["out_norm"], h, g)))
    return h.astype(x_dtype)


# ---- the decoder and the loss -----------------------------------------------------
def init_decoder(key, latent_channels=4, width=32):
    k = jax.random.split(key, 4)
    return {
        "c1": _conv_p(k[0], latent_channels, width),
        "c2": _conv_p(k[1], width, width),
        "c3": _conv_p(k[2], width, width // 2),
        "c4": _conv_p(k[3], width // 2, 3),
    }


def _up2(h):
    return jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)


@jax.checkpoint
def decode(p, z):
    """Latents (B, H, W, 4) to pixels (B, 4H, 4W, 3) in [-1, 1] (float32)."""
    h = jax.nn.silu(conv(p["c1"], z.astype(jnp.float32)))
    h = jax.nn.silu(conv(p["c2"], _up2(h)))
    h = jax.nn.silu(conv(p["c3"], _up2(h)))
    return jnp.tanh(conv(p["c4"], h))


# ---- strategies -------------------------------------------------------------------
def strategies(checkpoints: int):
    """(sampler, adjoint) texts, parsed through the library's registry."""
    return [
        ("DPMSolverPP()", "DTO()"),
        ("DPMSolverPP()", "DTO(checkpoints='steps')"),
        ("DPMSolverPP()", f"DTO(checkpoints={checkpoints})"),
        ("DPMSolverPP()", "AdjointDEIS(order=2)"),
        ("AsyncLeapfrog()", "ReversibleAdjoint()"),
        ("DPMSolverPP()", "Truncated(last=1)"),
    ]


# ---- measurement ------------------------------------------------------------------
def _status_kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_bytes(fn, args, device):
    """`fn(*args)` and the peak memory while it runs: on CPU the rise of the process's peak
    resident set (VmHWM, reset through /proc/self/clear_refs) over the resident set
    before the call; elsewhere the device's `peak_bytes_in_use` (a per-process high
    watermark: meaningful when each configuration runs in its own process)."""
    if device.platform == "cpu":
        try:
            before = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM)
                fh.write("5")
        except (OSError, RuntimeError):  # not Linux, or no permission
            return jax.block_until_ready(fn(*args)), math.nan
        out = jax.block_until_ready(fn(*args))
        return out, 1024.0 * max(_status_kib("VmHWM") - before, 0)
    out = jax.block_until_ready(fn(*args))
    stats = device.memory_stats() or {}
    return out, float(stats.get("peak_bytes_in_use", math.nan))


# Sampling is timed at least this many times: it is cheap, and it is shared by every
# strategy's R at its sampler and N.
SAMPLE_REPEATS = 3


def _median_time(fn, args, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Setup:
    """The problem at one size and weight dtype: inputs and the loss builder."""

    def __init__(self, size, batch, channels, dtype, seed=0, tokens=8, levels=3):
        cfg = UNetConfig(channels=channels, groups=min(8, channels // 2), levels=levels)
        self.cfg = cfg
        k = jax.random.split(jax.random.key(seed), 6)
        base, lora = init_unet(k[0], cfg)
        self.base = jax.tree_util.tree_map(lambda a: a.astype(dtype), base)
        self.lora = lora  # float32 adapters
        self.decoder = init_decoder(k[1], cfg.latent_channels)
        f32 = jnp.float32
        self.x_T = jax.random.normal(k[2], (batch, size, size, cfg.latent_channels), f32)
        self.ctx = jax.random.normal(k[3], (tokens, cfg.ctx_dim), f32)
        self.null_ctx = jnp.zeros((tokens, cfg.ctx_dim), f32)
        self.target = jax.random.uniform(
            k[4], (batch, 4 * size, 4 * size, 3), f32, minval=-1.0
        )
        self.schedule = aj.VPLinear()

    def loss_fn(self, sampler, adjoint, num_steps):
        ts = aj.time_grid(self.schedule, num_steps, t_end=1e-3, spacing="logsnr")
        cfg, schedule = self.cfg, self.schedule

        def loss(lora, base, decoder, x_T, ctx, null_ctx, target):
            # The base weights are closed over by the model (traced: they are an
            # argument of the jitted function); the gradient is the adapters'.
            def model(p, x, t, c):
                return unet(cfg, base, p, x, t, c)

            guided = aj.cfg(model, 7.5, null_ctx)
            x0 = aj.sample(
                guided, lora, x_T, ctx, schedule=schedule, ts=ts, sampler=sampler,
                adjoint=adjoint,
            )
            return jnp.mean((decode(decoder, x0) - target) ** 2)

        return loss

    @property
    def args(self):
        return (
            self.lora, self.base, self.decoder, self.x_T, self.ctx, self.null_ctx,
            self.target,
        )


def measure(setup, sampler_text, adjoint_text, num_steps, repeats, sample_cache):
    device = jax.devices()[0]
    sampler, adjoint = parse(sampler_text, "sampler"), parse(adjoint_text, "adjoint")
    loss = setup.loss_fn(sampler, adjoint, num_steps)
    args = setup.args
    # Sampling time: the same jitted loss without a gradient (sampling, decoding and
    # the loss), once per sampler and N.
    if (sampler_text, num_steps) not in sample_cache:
        fwd = jax.jit(loss).lower(*args).compile()
        jax.block_until_ready(fwd(*args))
        sample_cache[(sampler_text, num_steps)] = _median_time(
            fwd, args, max(SAMPLE_REPEATS, repeats)
        )
    t_sample = sample_cache[(sampler_text, num_steps)]
    t0 = time.perf_counter()
    grad = jax.jit(jax.value_and_grad(loss)).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = grad.memory_analysis()
    temp = float(getattr(mem, "temp_size_in_bytes", math.nan)) if mem else math.nan
    # The warm-up call is the one whose peak memory is measured.
    (value, g), peak = _peak_bytes(grad, args, device)
    finite = bool(
        jnp.isfinite(value)
        and all(jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(g))
    )
    gnorm = float(
        jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree_util.tree_leaves(g)))
    )
    t_grad = _median_time(grad, args, repeats)
    return dict(
        sampler=sampler_text,
        adjoint=adjoint_text,
        steps=num_steps,
        sample_time_s=t_sample,
        grad_time_s=t_grad,
        ratio=t_grad / t_sample,
        temp_bytes=temp,
        peak_bytes=peak,
        compile_time_s=compile_s,
        loss=float(value),
        grad_norm=gnorm,
        finite=finite,
    )


# ---- output -----------------------------------------------------------------------
def _mib(b):
    return "–" if not math.isfinite(b) else f"{b / 2**20:.1f}"


def device_name():
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{d.platform.upper()} {getattr(d, 'device_kind', '')}".strip()


def write_markdown(result, path):
    meta = result["meta"]
    lines = [
        f"Device: {meta['device']}. UNet with {meta['channels']} base channels "
        f"({meta['unet_params'] / 1e6:.2f} M parameters, {meta['lora_params'] / 1e3:.1f} k "
        f"LoRA), latents {meta['size']}×{meta['size']}×4 at batch {meta['batch']}, CFG "
        "(one batched call of both branches), decoder under `jax.checkpoint` in the loss, "
        "gradient with respect to the LoRA adapters; times are medians after a warm-up, "
        f"of {meta['repeats']} gradient run(s) and "
        f"{max(SAMPLE_REPEATS, meta['repeats'])} sampling runs; R = gradient / sampling time; temp. = "
        "XLA's compiled temporary memory of the gradient; peak = "
        + (
            "rise of the process's peak resident set during the gradient call."
            if meta["platform"] == "cpu"
            else "the device's peak bytes in use (one process per configuration)."
        ),
        "",
        "| weights | N | sampler + adjoint | sampling [s] | gradient [s] | R | temp. [MiB] | peak [MiB] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        flag = "" if r["finite"] else " (non-finite!)"
        lines.append(
            f"| {r['dtype']} | {r['steps']} | `{r['sampler']}` + `{r['adjoint']}`{flag} "
            f"| {r['sample_time_s']:.3f} | {r['grad_time_s']:.3f} | {r['ratio']:.2f} "
            f"| {_mib(r['temp_bytes'])} | {_mib(r['peak_bytes'])} |"
        )
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _count(tree):
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def run_one(cfg):
    """One (dtype, N, strategy) measurement, for a child process (`--one`)."""
    setup = Setup(
        cfg["size"], cfg["batch"], cfg["channels"], jnp.dtype(cfg["dtype"]),
        levels=cfg["levels"],
    )
    r = measure(setup, cfg["sampler"], cfg["adjoint"], cfg["steps"], cfg["repeats"], {})
    r["dtype"] = cfg["dtype"]
    return r


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--size", type=int, default=32, help="latent side (H = W)")
    p.add_argument("--batch", type=int, default=4, help="latents per sample call")
    p.add_argument("--channels", type=int, default=32, help="UNet base channels")
    p.add_argument("--steps", nargs="+", type=int, default=[20, 50],
                   help="sampler step counts N")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16"], help="base weights' dtype")
    p.add_argument("--checkpoints", type=int, default=5, help="k of DTO(checkpoints=k)")
    p.add_argument("--repeats", type=int, default=1,
                   help="timed gradient calls after the warm-up one (the median is reported; "
                   f"sampling is timed max({SAMPLE_REPEATS}, repeats) times)")
    p.add_argument("--only", nargs="+", metavar="ADJOINT", default=argparse.SUPPRESS,
                   help="run only the strategies whose adjoint text is listed "
                   "(default: all)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS,
                   help="one process per configuration (default: on accelerators, "
                   "where peak memory is a per-process high watermark; off on CPU)")
    p.add_argument("--tiny", action="store_true",
                   help="a smoke test: every strategy on a tiny one-level network, N = 2")
    p.add_argument("--out", default="docs/scale",
                   help="folder for scale.md and scale.json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(run_one(json.loads(a.one))))
        return 0
    levels = 3
    if a.tiny:
        a.size, a.batch, a.channels, a.steps, a.checkpoints = 8, 1, 8, [2], 2
        levels = 1
    device = jax.devices()[0]
    isolate = getattr(a, "isolate", device.platform != "cpu")
    print(f"device: {device_name()}; jax {jax.__version__}", flush=True)
    pairs = [
        s for s in strategies(a.checkpoints) if getattr(a, "only", None) is None or s[1] in a.only
    ]
    rows = []
    t_start = time.perf_counter()
    meta = None
    for dtype in a.dtypes:
        setup = Setup(a.size, a.batch, a.channels, jnp.dtype(dtype), levels=levels)
        if meta is None:
            meta = dict(
                device=device_name(), platform=device.platform, jax=jax.__version__,
                size=a.size, batch=a.batch, channels=a.channels, repeats=a.repeats,
                unet_params=_count(setup.base), lora_params=_count(setup.lora),
            )
        cache = {}
        for n in a.steps:
            for sampler, adjoint in pairs:
                if isolate:
                    cfg = dict(size=a.size, batch=a.batch, channels=a.channels,
                               levels=levels,
                               dtype=dtype, sampler=sampler, adjoint=adjoint, steps=n,
                               repeats=a.repeats)
                    out = subprocess.run(
                        [sys.executable, os.path.abspath(__file__), "--one",
                         json.dumps(cfg)],
                        capture_output=True, text=True, check=True,
                    ).stdout
                    r = json.loads(out.split("RESULT ", 1)[1])
                else:
                    r = measure(setup, sampler, adjoint, n, a.repeats, cache)
                    r["dtype"] = dtype
                rows.append(r)
                print(
                    f"  {dtype:8s} N={n:<3d} {sampler + ' + ' + adjoint:48s} "
                    f"sample {r['sample_time_s']:7.3f} s  grad {r['grad_time_s']:7.3f} s"
                    f"  R {r['ratio']:5.2f}  temp {_mib(r['temp_bytes']):>7} MiB  "
                    f"peak {_mib(r['peak_bytes']):>7} MiB  "
                    f"[{time.perf_counter() - t_start:5.0f} s]",
                    flush=True,
                )
    result = dict(meta=meta, rows=rows)
    os.makedirs(a.out, exist_ok=True)
    clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
    with open(os.path.join(a.out, "scale.json"), "w") as fh:
        json.dump(
            dict(meta=meta, rows=[{k: clean(v) for k, v in r.items()} for r in rows]),
            fh,
            indent=1,
        )
    write_markdown(result, os.path.join(a.out, "scale.md"))
    print(open(os.path.join(a.out, "scale.md")).read())
    bad = [r for r in rows if not r["finite"]]
    if bad:
        print(f"non-finite loss or gradient in {len(bad)} configuration(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
