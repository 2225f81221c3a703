"""Clipping and dynamic thresholding of the data prediction x̂_0, as diffusers'
DDIM/DDPM schedulers apply them (`clip_sample`, `thresholding`), with the
derivatives PyTorch's autograd gives them.

Both are piecewise linear in x̂_0, so differentiable almost everywhere; at the
kinks (a value exactly on a bound, a tie in the quantile's sort) JAX's own
primitives would split the derivative (`jnp.clip`'s gradient is ½ on a bound,
`jnp.abs`'s is 1 at 0), so each operation is written with `jnp.where` to give
torch's: `clamp` passes the gradient to its input on the closed interval and to a
tensor bound where the input lies beyond it, `abs` has derivative sign(x) (0 at 0),
and `quantile` interpolates linearly between the two order statistics around
q·(n − 1) with torch's `lerp` formula.
"""

import math

import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


def torch_clamp(x: Array, lo, hi) -> Array:
    """`torch.clamp(x, lo, hi)` = min(max(x, lo), hi): the derivative reaches x
    where lo ≤ x ≤ hi (bounds included), a (tensor) bound where x lies beyond it."""
    low = jnp.where(x < lo, lo, x)
    return jnp.where(low > hi, hi, low)


def clip_sample(x0: PyTree, limit: float) -> PyTree:
    """diffusers' `clip_sample`: every value of x̂_0 clamped to [−limit, limit]."""
    return jtu.tree_map(lambda v: torch_clamp(v, -limit, limit), x0)


def _torch_quantile(a: Array, q: float) -> Array:
    """`torch.quantile(a, q, dim=1)` (linear interpolation) of a 2-D array: the
    sorted row's values at floor and ceil of q·(n − 1), mixed by torch's `lerp`
    (w < ½: lo + w (hi − lo); else hi − (hi − lo)(1 − w))."""
    n = a.shape[1]
    rank = q * (n - 1)
    below = int(math.floor(rank))
    above = min(int(math.ceil(rank)), n - 1)
    w = rank - below
    srt = jnp.sort(a, axis=1)
    lo, hi = srt[:, below], srt[:, above]
    if w < 0.5:
        return lo + w * (hi - lo)
    return hi - (hi - lo) * (1.0 - w)


def _threshold_leaf(v: Array, ratio: float, max_value: float) -> Array:
    if v.ndim < 2:
        raise ValueError(
            "`thresholding` takes each leaf of x as diffusers' latents: a leading "
            f"batch axis and at least one more; got a leaf of shape {v.shape}."
        )
    flat = v.reshape(v.shape[0], -1)
    # |x| with torch's derivative sign(x) (0 at 0).
    s = _torch_quantile(flat * jnp.sign(flat), ratio)
    s = torch_clamp(s, 1.0, max_value)[:, None]
    return (torch_clamp(flat, -s, s) / s).reshape(v.shape)


def dynamic_threshold(x0: PyTree, ratio: float, max_value: float) -> PyTree:
    """diffusers' `_threshold_sample` (Imagen's dynamic thresholding): per batch
    element (each leaf's leading axis), s = the `ratio`-quantile of |x̂_0| over the
    other axes, clamped to [1, `max_value`]; x̂_0 is clamped to [−s, s] and divided
    by s."""
    return jtu.tree_map(lambda v: _threshold_leaf(v, ratio, max_value), x0)
