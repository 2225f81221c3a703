"""Weight fine-tuning through the sampler (AdjointDPM's "stylisation" job): fine-tune
the ε-network's weights θ (all of them, the FiLM layers, or the output head) so that
class-conditional samples have thicker strokes (a differentiable ink-coverage target)
while the shipped classifier still recognises them.

    python examples/finetune_style.py --adjoint 'AdjointDEIS()' --subset film

Prints ink coverage and classifier accuracy before and after, saves a before/after
grid and the loss curve, and compares the memory (XLA temporary bytes of the jitted
gradient) and time of one gradient step of `DTO()`, `AdjointDEIS()` and the reversible
`McCallumFoster(DPMSolver2())` + `ReversibleAdjoint()` for this job.
"""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

import adjoint_jax as aj

from _common import (
    ink,
    parser,
    progress,
    sample_fn,
    save_curve,
    save_grid,
    strategy,
    timed,
    trainable_mask,
)


def run(argv=None) -> dict:
    p = parser(__doc__, iters=20, batch=20, lr=1e-3)
    p.add_argument("--subset", default="film", choices=["all", "head", "film"],
                   help="which weights are fine-tuned")
    p.add_argument("--ink-scale", type=float, default=1.3,
                   help="target ink coverage as a multiple of the initial one")
    p.add_argument("--no-compare", action="store_true",
                   help="skip the memory/time comparison of strategies")
    args = p.parse_args(argv)
    sampler, adjoint = strategy(args)
    d = aj.zoo.digits()
    labels = jnp.arange(args.batch) % d.num_classes
    cond = d.cond(labels)
    x_T = jax.random.normal(jax.random.key(args.seed), (args.batch, *d.shape), jnp.float32)
    mask = trainable_mask(d.params, args.subset)
    train, frozen = eqx.partition(d.params, mask)

    x0_before = jax.jit(sample_fn(d, args, sampler, aj.DTO()))(d.params, x_T, cond)
    target = args.ink_scale * jnp.mean(ink(x0_before))

    def make_loss(sample):
        def loss_fn(train):
            x0 = sample(eqx.combine(train, frozen), x_T, cond)
            style = (jnp.mean(ink(x0)) - target) ** 2 * 100.0
            ce = optax.softmax_cross_entropy_with_integer_labels(d.classify(x0), labels)
            return style + 0.1 * jnp.mean(ce)

        return loss_fn

    loss_fn = make_loss(sample_fn(d, args, sampler, adjoint))
    opt = optax.adam(args.lr)

    @jax.jit
    def step(train, state):
        loss, g = jax.value_and_grad(loss_fn)(train)
        updates, state = opt.update(g, state)
        return optax.apply_updates(train, updates), state, loss

    def accuracy(x0):
        return float(jnp.mean(jnp.argmax(d.classify(x0), -1) == labels))

    state = opt.init(train)
    losses = []
    for _ in progress(range(args.iters), f"fine-tuning θ ({args.subset})", args.quiet):
        train, state, loss = step(train, state)
        losses.append(float(loss))
    tuned = eqx.combine(train, frozen)
    x0_after = jax.jit(sample_fn(d, args, sampler, aj.DTO()))(tuned, x_T, cond)

    result = {
        "sampler": repr(sampler),
        "adjoint": repr(adjoint),
        "subset": args.subset,
        "trainable_params": sum(v.size for v in jtu.tree_leaves(train)),
        "ink_before": float(jnp.mean(ink(x0_before))),
        "ink_after": float(jnp.mean(ink(x0_after))),
        "ink_target": float(target),
        "accuracy_before": accuracy(x0_before),
        "accuracy_after": accuracy(x0_after),
        "loss_first": losses[0],
        "loss_final": float(loss_fn(train)),
        "png": save_grid(f"{args.out}/finetune_style.png", [x0_before, x0_after],
                         ["before", "after"], [str(int(v)) for v in labels]),
        "curve": save_curve(f"{args.out}/finetune_style_loss.png",
                            {repr(adjoint): losses}, "loss"),
    }
    print(f"{result['adjoint']} with {result['sampler']}, {result['trainable_params']} "
          f"trainable weights ({args.subset}): ink {result['ink_before']:.3f} -> "
          f"{result['ink_after']:.3f} (target {result['ink_target']:.3f}), accuracy "
          f"{result['accuracy_before']:.0%} -> {result['accuracy_after']:.0%}")

    if not args.no_compare:
        rows = []
        for smp, adj in [(aj.DPMSolver2(), aj.DTO()), (aj.DPMSolver2(), aj.AdjointDEIS()),
                         (aj.McCallumFoster(aj.DPMSolver2()), aj.ReversibleAdjoint())]:
            g = jax.jit(jax.grad(make_loss(sample_fn(d, args, smp, adj))))
            mem = g.lower(train).compile().memory_analysis().temp_size_in_bytes
            rows.append({"strategy": f"{smp!r} + {adj!r}", "temp_bytes": int(mem),
                         "grad_time_s": timed(g, train)})
        result["comparison"] = rows
        print(f"one gradient step, N = {args.steps}, batch {args.batch}:")
        for r in rows:
            print(f"  {r['strategy']:48s} {r['temp_bytes'] / 2**20:8.1f} MiB "
                  f"{r['grad_time_s'] * 1e3:8.1f} ms")
    print(f"saved {result['png']} and {result['curve']}")
    return result


if __name__ == "__main__":
    run(sys.argv[1:])
