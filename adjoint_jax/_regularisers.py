"""Regularisers of noise optimisation: keep optimised noises typical of N(0, I)."""

import math

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


def _flat(tree: PyTree, batch_axes: int, name: str) -> Array:
    """The leaves of `tree` flattened to (batch, d), batch the product of the
    leading `batch_axes` axes (shared by every leaf)."""
    leaves = jtu.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"`{name}` needs at least one array.")
    if isinstance(batch_axes, bool) or not isinstance(batch_axes, int) or batch_axes < 0:
        raise ValueError(
            f"`{name}(..., batch_axes=...)` must be a non-negative int; got "
            f"{batch_axes!r}."
        )
    lead = jnp.shape(leaves[0])[:batch_axes]
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"`{name}` needs floating-point arrays; got {jnp.result_type(leaf)}.")
        if jnp.ndim(leaf) < batch_axes or jnp.shape(leaf)[:batch_axes] != lead:
            raise ValueError(
                f"`{name}(..., batch_axes={batch_axes})`: every leaf must share the "
                f"leading batch shape {lead}; got a leaf of shape {jnp.shape(leaf)}."
            )
    b = math.prod(lead)
    return jnp.concatenate([jnp.reshape(leaf, (b, -1)) for leaf in leaves], axis=1)


def chi_norm_regulariser(z: PyTree, *, batch_axes: int = 0) -> Array:
    """The χ-norm regulariser of ReNO (Eyring et al. 2024): the negative
    log-density of ‖z‖ under z ~ N(0, I_d), up to a constant,

        R(z) = ½‖z‖² − (d − 1) log‖z‖,

    whose gradient z − (d − 1) z/‖z‖² pulls ‖z‖ to √(d − 1), the mode of the χ_d
    distribution (a Gaussian noise in high dimension lives on that shell; an
    optimised noise drifting off it leaves the model's training distribution).

    **Arguments:**

    - `z`: the noise: an array or a pytree of arrays (x_T, and the step noises of
        `aj.sample(..., noise=...)`, together or alone); d is the number of entries
        per sample.
    - `batch_axes`: how many leading axes (shared by every leaf) index independent
        samples; each is regularised on its own and the values are summed.

    **Returns:** a scalar in the noise's dtype.
    """
    flat = _flat(z, batch_axes, "chi_norm_regulariser")
    d = flat.shape[1]
    sq = jnp.sum(flat * flat, axis=1)
    return jnp.sum(0.5 * sq - 0.5 * (d - 1) * jnp.log(sq))


def _tail_log_bounds(blocks: Array) -> tuple[Array, Array]:
    """log of DNO's tail bounds for m rows of k-dimensional blocks of N(0, I):
    the sample mean μ (P(‖μ‖ ≥ s) ≤ 2 exp(−m s²/(2k))) and the sample covariance C
    (‖C − I‖₂ ≥ (1 + √(k/m) + δ)² − 1 with probability ≤ 2 exp(−m δ²/2)), each
    capped at log ½ (a bound above 1 says nothing)."""
    m, k = blocks.shape
    mean = jnp.mean(blocks, axis=0)
    cov = blocks.T @ blocks / m
    dev = jnp.max(jnp.abs(jnp.linalg.eigvalsh(cov - jnp.eye(k, dtype=blocks.dtype))))
    cap = -math.log(2.0)
    log_mean = jnp.minimum(-m * jnp.sum(mean * mean) / (2 * k), cap)
    delta = jnp.maximum(jnp.sqrt(1.0 + dev) - 1.0 - math.sqrt(k / m), 0.0)
    log_cov = jnp.minimum(-m * delta * delta / 2, cap)
    return log_mean, log_cov


def dno_regulariser(
    z: PyTree, key: Array | None = None, *, block_size: int = 4, num_shuffles: int = 8
) -> Array:
    """DNO's probability regulariser (Tang et al., ICML 2025): how atypical the
    noise is of N(0, I), from high-dimensional concentration bounds.

    All entries of `z` (every leaf, every sample: x_T and the step noises together)
    are flattened into one vector of length D and cut into m = ⌊D/k⌋ rows of k
    entries (the remainder is dropped). For those rows, with sample mean μ and
    sample covariance C = (1/m) Σ_r b_r b_rᵀ, a Gaussian noise satisfies

        P(‖μ‖ ≥ s) ≤ 2 exp(−m s²/(2k)),
        P(√(1 + ‖C − I‖₂) ≥ 1 + √(k/m) + δ) ≤ 2 exp(−m δ²/2),

    and the regulariser is minus the log of these bounds evaluated at the noise's
    own statistics (each capped at log ½, so a typical noise costs a constant
    2 log 2 and has zero gradient):

        R(z) = −[log p_μ + log p_C](rows in order) − mean over shuffles of the same,

    the second term on `num_shuffles` random permutations of the entries (drawn
    from `key`), which catches structure the in-order rows miss. Without `key`,
    only the in-order term.

    **Arguments:** `z` (an array or pytree of arrays), `key` (a JAX PRNG key, or
    None), `block_size` (k, the row length: DNO uses 4^s, default 4),
    `num_shuffles` (permutations averaged, used with `key`).

    **Returns:** a scalar; 2 log 2 ≈ 1.386 per term for typical noise (4 log 2 with
    shuffles).
    """
    flat = _flat(z, 0, "dno_regulariser")[0]
    k = block_size
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`dno_regulariser(block_size=...)` must be a positive int; got {k!r}.")
    m = flat.shape[0] // k
    if m < 2:
        raise ValueError(
            f"`dno_regulariser` needs at least 2 rows of `block_size` = {k} entries; "
            f"the noise has {flat.shape[0]}."
        )

    def term(v):
        log_mean, log_cov = _tail_log_bounds(jnp.reshape(v[: m * k], (m, k)))
        return -(log_mean + log_cov)

    total = term(flat)
    if key is None:
        return total
    if isinstance(num_shuffles, bool) or not isinstance(num_shuffles, int) or num_shuffles < 1:
        raise ValueError(
            f"`dno_regulariser(num_shuffles=...)` must be a positive int; got {num_shuffles!r}."
        )
    keys = jax.random.split(key, num_shuffles)
    perms = jax.vmap(lambda kk: jax.random.permutation(kk, flat.shape[0]))(keys)
    return total + jnp.mean(jax.vmap(lambda p: term(flat[p]))(perms))
