"""Reward fine-tuning of the digits model's FiLM layers three ways, at equal model
evaluations: plain backprop through the sampler (`aj.DTO()`), Implicit Diffusion
(`aj.ImplicitDiffusion`: sampling and backprop in parallel through a shift register)
and Adjoint Matching (`aj.adjoint_matching_loss`: regression onto the lean adjoint of
memoryless DDIM(η = 1) trajectories, no backprop through the chain).

    python examples/implicit_adjoint_matching.py

The reward is ink coverage (thicker strokes). The budget is counted in evaluations of
the network on one batch of B images (`adjoint_jax.bench.count_evals`, forward
evaluations plus VJPs; a batched call over Implicit Diffusion's N register slots
counts N, its register warm-up is charged too). Prints, per method: the reward
reached on held-out class-conditional samples (DPMSolver2 sampling of the fine-tuned
model), the classifier's accuracy on them (still the asked-for digit?), their
diversity (mean pairwise distance between samples of the same class), evaluations
per step, steps taken and wall time; saves the table (markdown and JSON) and a plot
of reward against evaluations spent.
"""

import json
import os
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import adjoint_jax as aj
from adjoint_jax.bench import count_evals

from _common import ink, progress, save_reward_curves, study_parser, trainable_mask


METHODS = ("DTO()", "ImplicitDiffusion", "adjoint_matching_loss")


def parse(argv):
    p = study_parser(
        __doc__, steps=(20, "sampler steps N"), batch=(16, "images per optimisation step"),
        lr=3e-4, only="comma-separated substrings: run only the matching methods",
        out="folder for the table (.md, .json) and the plot")
    p.add_argument("--budget", type=int, default=6000,
                   help="network evaluations of one batch (forward + VJP) per method")
    p.add_argument("--lam", type=float, default=0.01,
                   help="Adjoint Matching's reward temperature λ (target ∝ p exp(r/λ))")
    p.add_argument("--num-times", type=int, default=5,
                   help="Adjoint Matching's regression times per trajectory")
    return p.parse_args(argv)


def diversity(x0, labels):
    """Mean pairwise Euclidean distance between samples of the same class (images
    clipped to the pixel range [−1, 1])."""
    flat = jnp.clip(x0, -1.0, 1.0).reshape(x0.shape[0], -1)
    dist = jnp.sqrt(jnp.maximum(
        jnp.sum((flat[:, None] - flat[None]) ** 2, -1), 0.0))
    same = (labels[:, None] == labels[None]) & ~jnp.eye(len(labels), dtype=bool)
    return jnp.sum(jnp.where(same, dist, 0.0)) / jnp.sum(same)


def run(argv=None) -> dict:
    args = parse(argv)
    d = aj.zoo.digits()
    n, b = args.steps, args.batch
    ts = aj.time_grid(d.schedule, n, t_end=1e-3)
    kw = dict(schedule=d.schedule, ts=ts, sampler=aj.DPMSolver2())
    labels = jnp.arange(b) % d.num_classes
    cond = d.cond(labels)
    train0, frozen = eqx.partition(d.params, trainable_mask(d.params, "film"))
    held_labels = jnp.arange(64) % d.num_classes
    held_x = jax.random.normal(jax.random.key(10_000 + args.seed), (64, *d.shape),
                               jnp.float32)
    held_cond = d.cond(held_labels)
    shape = (b, *d.shape)

    @jax.jit
    def evaluate(train):
        x0 = aj.sample(d.model, eqx.combine(train, frozen), held_x, held_cond, **kw)
        acc = jnp.mean(jnp.argmax(d.classify(x0), -1) == held_labels)
        return jnp.mean(ink(x0)), acc, diversity(x0, held_labels)

    def reward_loss(x0):
        return -jnp.mean(ink(x0))

    # The fine-tuned model sees `train` as params; the FiLM-free rest is closed over.
    def ft_model(train, x, t, c):
        return d.model(eqx.combine(train, frozen), x, t, c)

    opt = optax.adam(args.lr)
    methods = [m for m in METHODS if not args.only
               or any(s.strip() in m for s in args.only.split(",") if s.strip())]
    ink0, acc0, div0 = (float(v) for v in evaluate(train0))
    rows, curves = [], {}
    def dto_loss(train, key, model):
        x_T = jax.random.normal(key, shape, jnp.float32)
        return reward_loss(aj.sample(model, train, x_T, cond, **kw))

    def am_loss(train, key, model):
        k_x, k_am = jax.random.split(key)
        x_T = jax.random.normal(k_x, shape, jnp.float32)
        return aj.adjoint_matching_loss(
            model, train, train0, x_T, cond, schedule=d.schedule, ts=ts,
            terminal_cost=lambda x0: -jnp.sum(ink(x0)) / args.lam, key=k_am,
            num_times=args.num_times)

    def make_id(model):
        return aj.ImplicitDiffusion(model, schedule=d.schedule, ts=ts,
                                    sampler=aj.DPMSolver2(), loss=reward_loss, cond=cond)

    for name in methods:
        key = jax.random.key(args.seed)
        warm_units, warm_time, aux = 0, 0.0, None
        # grads(train, aux, key, model) -> (gradient, aux): aux is Implicit
        # Diffusion's register state (None for the others).
        if name == "ImplicitDiffusion":
            def grads(train, aux, key, model=ft_model):
                return make_id(model).step(train, aux, key)[:2]

            x_like = jnp.zeros(shape, jnp.float32)
            warm_units = _units(count_evals(
                lambda m, tr: make_id(m).init(tr, x_like, key), ft_model, train0))
            t0 = time.perf_counter()
            aux = jax.jit(lambda tr, k: make_id(ft_model).init(tr, x_like, k))(train0, key)
            jax.block_until_ready(aux)
            warm_time = time.perf_counter() - t0
        else:
            loss = dto_loss if name == "DTO()" else am_loss

            def grads(train, aux, key, model=ft_model, loss=loss):
                return jax.grad(loss)(train, key, model), aux

        units = _units(count_evals(lambda m, tr, a: grads(tr, a, key, model=m),
                                   ft_model, train0, aux))

        @jax.jit
        def step(train, ostate, aux, key, grads=grads):
            g, aux = grads(train, aux, key)
            u, ostate = opt.update(g, ostate, train)
            return optax.apply_updates(train, u), ostate, aux

        iters = max(1, (args.budget - warm_units) // units)
        train, ostate = train0, opt.init(train0)
        curve = [(warm_units, ink0)]
        every = max(1, iters // 8)
        # Compile outside the timing (the result of this call is discarded).
        jax.block_until_ready(step(train, ostate, aux, key))
        elapsed = warm_time
        for it in progress(range(iters), name, args.quiet):
            t0 = time.perf_counter()
            train, ostate, aux = step(train, ostate, aux, jax.random.fold_in(key, it))
            jax.block_until_ready(train)
            elapsed += time.perf_counter() - t0
            if (it + 1) % every == 0 or it + 1 == iters:
                curve.append((warm_units + (it + 1) * units, float(evaluate(train)[0])))
        reward, acc, div = (float(v) for v in evaluate(train))
        rows.append({"method": name, "reward": reward, "accuracy": acc, "diversity": div,
                     "evals_per_step": units, "warm_up_evals": warm_units,
                     "steps": iters, "evals": warm_units + iters * units,
                     "wall_s": elapsed})
        curves[name] = curve

    result = {"N": n, "batch": b, "budget": args.budget, "lam": args.lam,
              "num_times": args.num_times, "reward_before": ink0,
              "accuracy_before": acc0, "diversity_before": div0, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    md = [f"Reward fine-tuning (ink coverage) of the FiLM layers, N = {n}, batch {b}, "
          f"budget {args.budget} batch evaluations each (Adjoint Matching: λ = "
          f"{args.lam}, {args.num_times} regression times). Before: reward "
          f"{ink0:.3f}, accuracy {acc0:.0%}, diversity {div0:.2f}.", "",
          "| method | reward | accuracy | diversity | evals/step | warm-up evals | "
          "steps | evals | wall s |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['method']} | {r['reward']:.3f} | {r['accuracy']:.0%} | "
                  f"{r['diversity']:.2f} | {r['evals_per_step']} | "
                  f"{r['warm_up_evals']} | {r['steps']} | {r['evals']} | "
                  f"{r['wall_s']:.1f} |")
    result["table"] = os.path.join(args.out, "implicit_adjoint_matching.md")
    with open(result["table"], "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(args.out, "implicit_adjoint_matching.json"), "w") as f:
        json.dump(result | {"curves": curves}, f, indent=1)
    result["plot"] = save_reward_curves(
        os.path.join(args.out, "implicit_adjoint_matching.png"), curves, ink0,
        "network evaluations of one batch spent (forward + VJP)")
    print("\n".join(md))
    print(f"saved {result['table']} and {result['plot']}")
    return result


def _units(c) -> int:
    # Lanes: a call vmapped over k batches (Implicit Diffusion's N slots, Adjoint
    # Matching's K regression times) is k evaluations of one batch.
    return c.forward_lanes + c.vjp_lanes


if __name__ == "__main__":
    run(sys.argv[1:])
