"""Guided generation by latent optimisation: optimise the initial noise x_T (optax
Adam) so the shipped classifier assigns the generated digit to a target class, with a
penalty keeping x_T Gaussian-like. The conditioning is the null (unconditional)
embedding, so the class comes from x_T alone.

    python examples/guide_latent.py --adjoint 'AdjointDEIS()' --sampler 'DPMSolver1()'

Prints the success rate (samples classified as their target) before and after, and
saves a before/after grid and the loss curve in --out.
"""

import sys

import jax
import jax.numpy as jnp
import optax

import adjoint_jax as aj

from _common import (
    gaussian_penalty,
    parser,
    progress,
    sample_fn,
    save_curve,
    save_grid,
    strategy,
)


def run(argv=None) -> dict:
    p = parser(__doc__, iters=30, batch=20, lr=0.1)
    p.add_argument("--penalty", type=float, default=1.0, help="weight of the prior term")
    args = p.parse_args(argv)
    sampler, adjoint = strategy(args)
    d = aj.zoo.digits()
    key = jax.random.key(args.seed)
    k_x, k_s = jax.random.split(key)
    x_T = jax.random.normal(k_x, (args.batch, *d.shape), jnp.float32)
    targets = jnp.arange(args.batch) % d.num_classes
    cond = d.cond_null((args.batch,))
    sample = sample_fn(d, args, sampler, adjoint, key=k_s)

    def loss_fn(x_T):
        x0 = sample(d.params, x_T, cond)
        ce = optax.softmax_cross_entropy_with_integer_labels(d.classify(x0), targets)
        return jnp.mean(ce + args.penalty * gaussian_penalty(x_T)), x0

    opt = optax.adam(args.lr)

    @jax.jit
    def step(x_T, state):
        (loss, x0), g = jax.value_and_grad(loss_fn, has_aux=True)(x_T)
        updates, state = opt.update(g, state)
        return optax.apply_updates(x_T, updates), state, loss, x0

    def success(x0):
        return float(jnp.mean(jnp.argmax(d.classify(x0), -1) == targets))

    state = opt.init(x_T)
    losses, x0_before = [], None
    for _ in progress(range(args.iters), "guiding x_T", args.quiet):
        x_T, state, loss, x0 = step(x_T, state)
        x0_before = x0 if x0_before is None else x0_before
        losses.append(float(loss))
    x0_after = jax.jit(sample)(d.params, x_T, cond)
    final_loss = float(loss_fn(x_T)[0])
    result = {
        "sampler": repr(sampler),
        "adjoint": repr(adjoint),
        "success_before": success(x0_before),
        "success_after": success(x0_after),
        "loss_first": losses[0],
        "loss_final": final_loss,
        "png": save_grid(f"{args.out}/guide_latent.png", [x0_before, x0_after],
                         ["before", "after"], [str(int(t)) for t in targets]),
        "curve": save_curve(f"{args.out}/guide_latent_loss.png", {repr(adjoint): losses},
                            "loss"),
    }
    print(f"{result['adjoint']} with {result['sampler']}: success rate "
          f"{result['success_before']:.0%} -> {result['success_after']:.0%}, loss "
          f"{result['loss_first']:.3f} -> {result['loss_final']:.3f}")
    print(f"saved {result['png']} and {result['curve']}")
    return result


if __name__ == "__main__":
    run(sys.argv[1:])
