"""Latent guidance with the batch sharded across devices: the latents x_T (and their
conditioning) are laid out over a 1-D device mesh with `jax.sharding` (Mesh +
NamedSharding), the weights are replicated, and the gradient step is jit-compiled
once for the whole mesh; every device samples and differentiates its own slice.

On a CPU-only machine the devices are simulated: the script sets
`XLA_FLAGS=--xla_force_host_platform_device_count=4` unless XLA_FLAGS is already set.

    python examples/sharded_guidance.py --adjoint 'AdjointDEIS()'

Checks (and prints) that the sharded gradient equals the single-device gradient and
that the outputs keep the inputs' sharding, then runs the guidance loop.
"""

import os


os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import adjoint_jax as aj  # noqa: E402

from _common import (  # noqa: E402
    gaussian_penalty,
    parser,
    progress,
    sample_fn,
    save_curve,
    save_grid,
    strategy,
)


def run(argv=None) -> dict:
    p = parser(__doc__, iters=10, batch=8, lr=0.1)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    sampler, adjoint = strategy(args)
    devices = jax.devices()
    if args.batch % len(devices):
        raise SystemExit(f"--batch must be a multiple of the {len(devices)} devices")
    d = aj.zoo.digits()
    mesh = Mesh(devices, ("batch",))
    by_batch = NamedSharding(mesh, P("batch"))
    replicated = NamedSharding(mesh, P())

    x_T = jax.random.normal(jax.random.key(args.seed), (args.batch, *d.shape), jnp.float32)
    targets = jnp.arange(args.batch) % d.num_classes
    cond = d.cond_null((args.batch,))
    sample = sample_fn(d, args, sampler, adjoint, key=jax.random.key(args.seed + 1))

    def loss_fn(x_T, params, cond, targets):
        x0 = sample(params, x_T, cond)
        ce = optax.softmax_cross_entropy_with_integer_labels(d.classify(x0), targets)
        return jnp.mean(ce + gaussian_penalty(x_T))

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))

    # Single-device reference, then the sharded run of the same function.
    loss_1, g_1 = grad_fn(x_T, d.params, cond, targets)
    xs = jax.device_put(x_T, by_batch)
    cs = jax.device_put(cond, by_batch)
    ys = jax.device_put(targets, by_batch)
    ps = jax.device_put(d.params, replicated)
    loss_n, g_n = grad_fn(xs, ps, cs, ys)
    rel = float(jnp.linalg.norm(g_n - g_1) / jnp.linalg.norm(g_1))

    opt = optax.adam(args.lr)

    @jax.jit
    def step(x, state):
        loss, g = jax.value_and_grad(loss_fn)(x, ps, cs, ys)
        updates, state = opt.update(g, state)
        return optax.apply_updates(x, updates), state, loss

    # Lay the optimiser state out like x (moments sharded by batch, step count
    # replicated), so that every step sees the same shardings and compiles once.
    state = jax.tree.map(
        lambda a: jax.device_put(a, by_batch if a.shape == xs.shape else replicated),
        opt.init(xs),
    )
    losses = []
    x = xs
    for _ in progress(range(args.iters), f"guiding on {len(devices)} devices", args.quiet):
        x, state, loss = step(x, state)
        losses.append(float(loss))
    result = {
        "devices": len(devices),
        "sampler": repr(sampler),
        "adjoint": repr(adjoint),
        "grad_rel_diff_vs_single_device": rel,
        "loss_rel_diff_vs_single_device": float(abs(loss_n - loss_1) / abs(loss_1)),
        "grad_sharding_is_input_sharding": bool(g_n.sharding.is_equivalent_to(
            xs.sharding, xs.ndim)),
        "latent_sharding_kept": bool(x.sharding.is_equivalent_to(xs.sharding, xs.ndim)),
        "loss_first": losses[0] if losses else None,
        "loss_final": float(loss_fn(x, ps, cs, ys)),
        "step_compilations": step._cache_size(),
    }
    # The figures in --out: the samples before and after guidance (gathered from
    # the devices) and the loss curve.
    x0_before = jax.device_get(sample(d.params, x_T, cond))
    x0_after = jax.device_get(sample(d.params, x, cs))
    result["png"] = save_grid(os.path.join(args.out, "sharded_guidance.png"),
                              [x0_before, x0_after], ["before", "after"],
                              [str(int(t)) for t in targets])
    result["curve"] = save_curve(os.path.join(args.out, "sharded_guidance_loss.png"),
                                 {repr(adjoint): losses}, "loss")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['devices']} devices, {result['adjoint']} with {result['sampler']}: "
              f"sharded vs single-device gradient rel. diff {rel:.1e}; output sharding "
              f"= input sharding: {result['grad_sharding_is_input_sharding']}; loss "
              f"{result['loss_first']:.3f} -> {result['loss_final']:.3f}; saved "
              f"{result['png']} and {result['curve']}")
    return result


if __name__ == "__main__":
    run(sys.argv[1:])
