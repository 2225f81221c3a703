"""The digits ε-network: a small class-conditional convolutional ResNet (Equinox) for
the 8×8 handwritten digits of `sklearn.datasets.load_digits`.

Conventions (shared with the classifier in `_classifier.py`):

- one image has shape `(8, 8)`, one grey channel, pixel values scaled from 0..16 to
  [-1, 1] (`to_model_space`);
- the conditioning is a continuous vector z of length `cond_dim`: a learned
  class-embedding table gives z = table[label], and row `num_classes` of the table is
  the "null" (unconditional) embedding the network was also trained on (label
  dropout), so classifier-free guidance is possible;
- the network predicts ε from (x, t, z). It is batch-aware: x of shape
  `(..., 8, 8)` and z of shape `(..., cond_dim)` broadcast over their leading
  dimensions; `t` is a scalar (as `aj.sample` passes it) or broadcasts likewise.

The layers are written for batches in NHWC layout rather than with `eqx.nn.Conv2d`
(per-example CHW, vmapped): XLA:CPU runs NCHW convolutions inside a `lax.scan` (the
sampling loop) some 30 times slower than at top level, NHWC ones at full speed.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

from .._schedule import AbstractSchedule


IMAGE_SHAPE = (8, 8)


def to_model_space(images: ArrayLike) -> np.ndarray:
    """`load_digits` pixel values (0..16) to the model's [-1, 1], float32."""
    return np.asarray(images, np.float32) / 8.0 - 1.0


def to_pixel_space(x: ArrayLike) -> np.ndarray:
    """The model's [-1, 1] back to [0, 1] grey levels (clipped), for plotting."""
    return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def _channel_vec(v: Array, ndim: int) -> Array:
    # A per-channel vector shaped to broadcast against an array of rank `ndim`
    # (explicitly, so that `jax_numpy_rank_promotion="raise"` is satisfied).
    return v.reshape((1,) * (ndim - 1) + (-1,))


class _Dense(eqx.Module):
    weight: Array  # (in, out)
    bias: Array

    def __init__(self, d_in: int, d_out: int, key, zero: bool = False):
        lim = 1.0 / math.sqrt(d_in)
        w = jax.random.uniform(key, (d_in, d_out), jnp.float32, -lim, lim)
        self.weight = jnp.zeros_like(w) if zero else w
        self.bias = jnp.zeros((d_out,), jnp.float32)

    def __call__(self, x: Array) -> Array:
        y = x @ self.weight
        return y + _channel_vec(self.bias, y.ndim)


class _Conv3x3(eqx.Module):
    weight: Array  # (3, 3, in, out), HWIO
    bias: Array

    def __init__(self, c_in: int, c_out: int, key, zero: bool = False):
        lim = 1.0 / math.sqrt(9 * c_in)
        w = jax.random.uniform(key, (3, 3, c_in, c_out), jnp.float32, -lim, lim)
        self.weight = jnp.zeros_like(w) if zero else w
        self.bias = jnp.zeros((c_out,), jnp.float32)

    def __call__(self, x: Array) -> Array:  # (B, H, W, C)
        y = jax.lax.conv_general_dilated(
            x, self.weight, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + _channel_vec(self.bias, y.ndim)


class _GroupNorm(eqx.Module):
    scale: Array
    shift: Array
    groups: int = eqx.field(static=True)

    def __init__(self, groups: int, channels: int):
        self.scale = jnp.ones((channels,), jnp.float32)
        self.shift = jnp.zeros((channels,), jnp.float32)
        self.groups = groups

    def __call__(self, x: Array) -> Array:  # (B, H, W, C)
        b, h, w, c = x.shape
        g = x.reshape(b, h, w, self.groups, c // self.groups)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.mean((g - mean) ** 2, axis=(1, 2, 4), keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + 1e-5)
        g = g.reshape(b, h, w, c)
        return g * _channel_vec(self.scale, 4) + _channel_vec(self.shift, 4)


class _ResBlock(eqx.Module):
    norm1: _GroupNorm
    conv1: _Conv3x3
    film: _Dense
    norm2: _GroupNorm
    conv2: _Conv3x3

    def __init__(self, channels: int, emb_dim: int, groups: int, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.norm1 = _GroupNorm(groups, channels)
        self.conv1 = _Conv3x3(channels, channels, k1)
        self.film = _Dense(emb_dim, 2 * channels, k2)
        self.norm2 = _GroupNorm(groups, channels)
        # Zero-initialised last convolution: each block starts as the identity.
        self.conv2 = _Conv3x3(channels, channels, k3, zero=True)

    def __call__(self, h: Array, emb: Array) -> Array:
        y = self.conv1(jax.nn.silu(self.norm1(h)))
        scale, shift = jnp.split(self.film(emb)[:, None, None, :], 2, axis=-1)
        y = self.norm2(y) * (1.0 + scale) + shift
        return h + self.conv2(jax.nn.silu(y))


class DigitsEpsNet(eqx.Module):
    """ε_θ(x, t, z) for 8×8 digits.

    The noise level enters as the log-SNR λ(t) of `schedule` through fixed sinusoidal
    features and an MLP, the conditioning z through a linear map; their sum modulates
    every residual block (FiLM: per-channel scale and shift).
    """

    schedule: AbstractSchedule
    conv_in: _Conv3x3
    noise_mlp: tuple[_Dense, _Dense]
    cond_proj: _Dense
    blocks: tuple[_ResBlock, ...]
    norm_out: _GroupNorm
    conv_out: _Conv3x3
    num_freqs: int = eqx.field(static=True)
    cond_dim: int = eqx.field(static=True)

    def __init__(
        self,
        schedule: AbstractSchedule,
        *,
        channels: int = 48,
        num_blocks: int = 3,
        emb_dim: int = 128,
        cond_dim: int = 16,
        num_freqs: int = 16,
        groups: int = 8,
        key,
    ):
        keys = jax.random.split(key, num_blocks + 5)
        self.schedule = schedule
        self.cond_dim = cond_dim
        self.num_freqs = num_freqs
        self.conv_in = _Conv3x3(1, channels, keys[0])
        self.noise_mlp = (
            _Dense(2 * num_freqs + 1, emb_dim, keys[1]),
            _Dense(emb_dim, emb_dim, keys[2]),
        )
        self.cond_proj = _Dense(cond_dim, emb_dim, keys[3])
        self.blocks = tuple(_ResBlock(channels, emb_dim, groups, k) for k in keys[5:])
        self.norm_out = _GroupNorm(groups, channels)
        self.conv_out = _Conv3x3(channels, 1, keys[4], zero=True)

    def _dtype(self):
        return self.conv_in.weight.dtype

    def embed_noise(self, t: Array) -> Array:
        """Noise-level features of shape `(B, emb_dim)` for times t of shape `(B,)`."""
        lam = self.schedule.lam(t).astype(self._dtype())[:, None]
        # Frequencies from 1/8 to 8 (geometric); λ spans about [−5, 7] for VPLinear.
        freqs = np.exp(np.linspace(math.log(0.125), math.log(8.0), self.num_freqs))
        arg = lam * jnp.asarray(freqs, lam.dtype)[None, :]
        feats = jnp.concatenate([jnp.sin(arg), jnp.cos(arg), lam / 8.0], axis=-1)
        return self.noise_mlp[1](jax.nn.silu(self.noise_mlp[0](feats)))

    def _batched(self, x: Array, t: Array, z: Array) -> Array:
        # x (B, 8, 8), t (B,), z (B, cond_dim).
        emb = jax.nn.silu(self.embed_noise(t) + self.cond_proj(z))
        h = self.conv_in(x[..., None])
        for block in self.blocks:
            h = block(h, emb)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))[..., 0]

    def __call__(self, x: Array, t: ArrayLike, z: Array) -> Array:
        """ε for x of shape `(..., 8, 8)`, z of shape `(..., cond_dim)` and t a scalar
        or of shape `(...)`; the leading dimensions broadcast. Computes in the weights'
        dtype (float32) and returns ε in x's dtype."""
        dtype = self._dtype()
        x_dtype = x.dtype
        x = x.astype(dtype)
        z = jnp.asarray(z).astype(dtype)
        t = jnp.asarray(t).astype(dtype)
        if x.shape[-2:] != IMAGE_SHAPE or z.shape[-1:] != (self.cond_dim,):
            raise ValueError(
                f"The digits model needs x of shape (..., 8, 8) and cond of shape "
                f"(..., {self.cond_dim}); got {x.shape} and {z.shape}."
            )
        batch = jnp.broadcast_shapes(x.shape[:-2], z.shape[:-1], t.shape)
        x = jnp.broadcast_to(x, batch + IMAGE_SHAPE).reshape((-1,) + IMAGE_SHAPE)
        z = jnp.broadcast_to(z, batch + z.shape[-1:]).reshape((-1, self.cond_dim))
        t = jnp.broadcast_to(t, batch).reshape(-1)
        eps = self._batched(x, t, z)
        return eps.reshape(batch + IMAGE_SHAPE).astype(x_dtype)
