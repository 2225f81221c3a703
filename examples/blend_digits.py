"""Digit blending, the seed papers' "morph" task on digits: given two generated
source digits of different classes, optimise x_T and the conditioning embedding z so
the generated sample's classifier embedding is close to both sources' embeddings
(loss = mean embedding distance to the two sources).

    python examples/blend_digits.py --adjoint 'AdjointDEIS()' --sampler 'DPMSolver1()'

A blend "verifies" against a source when their embedding distance is below the
threshold at which 1% of real different-class digit pairs (scikit-learn's digits)
would be accepted (a false-match rate of 1%, as face verification is run at a fixed
FMR). Reports how many blends verify against both sources, for the optimised blends
and for the simple baseline of interpolating the sources' x_T (slerp) and z
(midpoint) without optimisation, with the model evaluations (NFE) each used.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adjoint_jax as aj

from _common import count_nfe, parser, progress, sample_fn, save_curve, save_grid, strategy


PAIRS = [(0, 6), (1, 7), (3, 8), (4, 9), (5, 6), (2, 3), (7, 9), (3, 5)]


def verification_threshold(d, fmr: float = 0.01) -> float:
    """The embedding distance accepted by `fmr` of real different-class pairs."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = jnp.asarray(data.images / 8.0 - 1.0, jnp.float32)
    labels = np.asarray(data.target)
    emb = np.asarray(jax.jit(lambda im: d.embed(im))(images))
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(labels), (2, 20000))
    diff = labels[i] != labels[j]
    dist = np.linalg.norm(emb[i[diff]] - emb[j[diff]], axis=-1)
    return float(np.quantile(dist, fmr))


def slerp(a, b, w=0.5):
    axes = tuple(range(1, a.ndim))
    na = jnp.linalg.norm(a.reshape(a.shape[0], -1), axis=-1)
    nb = jnp.linalg.norm(b.reshape(b.shape[0], -1), axis=-1)
    cos = jnp.sum(a * b, axis=axes) / (na * nb)
    omega = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    so = jnp.sin(omega)
    wa = (jnp.sin((1 - w) * omega) / so).reshape((-1,) + (1,) * len(axes))
    wb = (jnp.sin(w * omega) / so).reshape((-1,) + (1,) * len(axes))
    return wa * a + wb * b


def setup(args, d):
    """Sources, their embeddings, and the baseline blend's x_T and z."""
    n = args.batch
    pairs = jnp.asarray([PAIRS[k % len(PAIRS)] for k in range(n)])
    k1, k2 = jax.random.split(jax.random.key(args.seed))
    xa = jax.random.normal(k1, (n, *d.shape), jnp.float32)
    xb = jax.random.normal(k2, (n, *d.shape), jnp.float32)
    za, zb = d.cond(pairs[:, 0]), d.cond(pairs[:, 1])
    return pairs, xa, xb, za, zb


def blend_loss(d, x0, ea, eb):
    e = d.embed(x0)
    return 0.5 * (jnp.linalg.norm(e - ea, axis=-1) + jnp.linalg.norm(e - eb, axis=-1))


def run(argv=None, *, scheduled: bool = False, name: str = "blend_digits",
        doc: str = __doc__) -> dict:
    p = parser(doc, iters=30, batch=8, lr=0.05)
    args = p.parse_args(argv)
    sampler, adjoint = strategy(args)
    d = aj.zoo.digits()
    # Sources are generated with the exact sampler at the same budget.
    plain = sample_fn(d, args, sampler, aj.DTO())
    pairs, xa, xb, za, zb = setup(args, d)
    src_a, src_b = jax.jit(plain)(d.params, xa, za), jax.jit(plain)(d.params, xb, zb)
    ea, eb = d.embed(src_a), d.embed(src_b)
    thr = verification_threshold(d)

    x_T = slerp(xa, xb)
    z = 0.5 * (za + zb)
    if scheduled:
        # One conditioning value per sampler step (Theorem 3), initialised constant.
        z = aj.Scheduled(jnp.broadcast_to(z, (args.steps, *z.shape)))
    sample = sample_fn(d, args, sampler, adjoint)

    baseline = jax.jit(sample)(d.params, x_T, z)
    base_dist = blend_loss(d, baseline, ea, eb)

    def loss_fn(xz):
        x0 = sample(d.params, xz[0], xz[1])
        return jnp.mean(blend_loss(d, x0, ea, eb))

    opt = optax.adam(args.lr)

    @jax.jit
    def step(xz, state):
        loss, g = jax.value_and_grad(loss_fn)(xz)
        updates, state = opt.update(g, state)
        return optax.apply_updates(xz, updates), state, loss

    xz = (x_T, z)
    state = opt.init(xz)
    losses = []
    for _ in progress(range(args.iters), f"optimising x_T and z ({name})", args.quiet):
        xz, state, loss = step(xz, state)
        losses.append(float(loss))
    blended = jax.jit(sample)(d.params, xz[0], xz[1])
    opt_dist = blend_loss(d, blended, ea, eb)

    def verified(x0):
        e = d.embed(x0)
        ok = (jnp.linalg.norm(e - ea, axis=-1) < thr) & (jnp.linalg.norm(e - eb, axis=-1) < thr)
        return int(jnp.sum(ok))

    # NFE (model evaluations; the model is batched, so per blend): one sample for
    # the baseline; `iters` gradient steps plus the final sample when optimising.
    grad_once = lambda model, v: jax.grad(
        lambda v: jnp.sum(sample(d.params, v[0], v[1], model=model) ** 2))(v)
    nfe_grad = count_nfe(grad_once, d, (x_T, z))
    nfe_sample = args.steps * sampler.evals_per_step
    result = {
        "sampler": repr(sampler),
        "adjoint": repr(adjoint),
        "threshold": thr,
        "blends": int(args.batch),
        "verified_baseline": verified(baseline),
        "verified_optimised": verified(blended),
        "loss_baseline": float(jnp.mean(base_dist)),
        "loss_first": losses[0],
        "loss_final": float(jnp.mean(opt_dist)),
        "nfe_baseline": nfe_sample,
        "nfe_optimised": args.iters * nfe_grad + nfe_sample,
        "png": save_grid(
            f"{args.out}/{name}.png", [src_a, baseline, blended, src_b],
            ["source a", "baseline", "optimised", "source b"],
            [f"{int(a)}+{int(b)}" for a, b in pairs],
        ),
        "curve": save_curve(f"{args.out}/{name}_loss.png", {repr(adjoint): losses},
                            "mean embedding distance"),
    }
    print(
        f"{result['adjoint']} with {result['sampler']}: verified against both sources "
        f"(threshold {thr:.3f} at FMR 1%): baseline {result['verified_baseline']}/"
        f"{args.batch} with {result['nfe_baseline']} NFE each, optimised "
        f"{result['verified_optimised']}/{args.batch} with {result['nfe_optimised']} NFE "
        f"each; mean distance {result['loss_baseline']:.3f} -> {result['loss_final']:.3f}"
    )
    print(f"saved {result['png']} and {result['curve']}")
    return result


if __name__ == "__main__":
    run(sys.argv[1:])
