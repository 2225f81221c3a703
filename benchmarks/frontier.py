"""The accuracy frontier's own figures: error-controlled grids (`aj.adaptive_time_grid`)
against tolerance, and the reversible exponential Runge–Kutta ("Rex",
`aj.McCallumFoster(aj.ExpRK(...))` + `aj.ReversibleAdjoint()`) against `aj.DTO()` in
memory and time. (Against the peers: `benchmarks/peers.py`.)

1. Adaptive grids, float64, on the closed-form Gaussian (`GaussianProblem.make(4)`)
   and the sharp mixture (`MixtureProblem.make(2)`, batch 8, truth: a converged
   Dopri8 solve): for each tableau with an error estimate and each rtol = atol, the
   accepted steps, the attempts (rejected included), and the relative errors of x_0
   and of ∂L/∂x_T (`aj.DTO()` on the grid) against the truth.
2. Rex on a random MLP ε-network (width 256, 16 dimensions, batch 64, float64):
   XLA's temporary memory of the jitted gradient at N = 16, 64, 128 and the
   gradient's time over the sampling time (R), for `ReversibleAdjoint` and `DTO`.

    python benchmarks/frontier.py --out docs/frontier
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp


jax.config.update("jax_enable_x64", True)

import adjoint_jax as aj  # noqa: E402
from adjoint_jax.bench import GaussianProblem, MixtureProblem, MLPProblem  # noqa: E402
from adjoint_jax.bench._compare import _median_time  # noqa: E402


T_END = 1e-3


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _loss(x0):
    return jnp.sum(jnp.sin(x0) + 0.3 * x0**2)


def adaptive_rows(tols, tableaus):
    gauss = GaussianProblem.make(4)
    mix = MixtureProblem.make(2)
    problems = {
        "gaussian": (gauss, jnp.array([0.3, -1.2, 0.7, 2.0]),
                     lambda x: gauss.flow_map(gauss.params, x, None,
                                              gauss.schedule.t_max, T_END)),
        "mixture": (mix, jax.random.normal(jax.random.key(0), (8, 2)),
                    lambda x: mix.reference(mix.params, x, None, mix.schedule.t_max,
                                            T_END, rtol=1e-12, atol=1e-12)),
    }
    rows = []
    for name, (pb, x_T, truth_fn) in problems.items():
        truth = truth_fn(x_T)
        g_truth = jax.grad(lambda x: _loss(truth_fn(x)))(x_T)
        for tab in tableaus:
            sampler = aj.ExpRK(tab)
            for tol in tols:
                ts, n = aj.adaptive_time_grid(
                    pb.model, pb.params, x_T, None, schedule=pb.schedule,
                    sampler=sampler, rtol=tol, atol=tol, max_steps=2048, t_end=T_END)

                def loss(x, ts=ts):
                    return _loss(aj.sample(pb.model, pb.params, x, None,
                                           schedule=pb.schedule, ts=ts, sampler=sampler))

                x0 = aj.sample(pb.model, pb.params, x_T, None, schedule=pb.schedule,
                               ts=ts, sampler=sampler)
                g = jax.jit(jax.grad(loss))(x_T)
                rows.append(dict(problem=name, tableau=tab, tol=tol, steps=int(n),
                                 x0_error=_rel(x0, truth), grad_error=_rel(g, g_truth)))
                print(rows[-1], flush=True)
    return rows


def _timed(f, *args, repeats=5):
    return _median_time(f, args, repeats, min_time=0.0)


def rex_rows(ns, tableau):
    pb = MLPProblem.make(jax.random.key(0), dim=16, width=256, cond_dim=2)
    x_T = jax.random.normal(jax.random.key(1), (64, 16))
    sampler = aj.McCallumFoster(aj.ExpRK(tableau))
    rows = []
    for n in ns:
        ts = aj.time_grid(pb.schedule, n, t_end=T_END)
        sample = jax.jit(lambda p: aj.sample(pb.model, p, x_T, None, schedule=pb.schedule,
                                             ts=ts, sampler=sampler))
        t_sample = _timed(sample, pb.params)
        for adjoint in (aj.ReversibleAdjoint(), aj.DTO()):
            grad = jax.jit(jax.grad(lambda p, adjoint=adjoint: _loss(aj.sample(
                pb.model, p, x_T, None, schedule=pb.schedule, ts=ts, sampler=sampler,
                adjoint=adjoint))))
            temp = grad.lower(pb.params).compile().memory_analysis().temp_size_in_bytes
            rows.append(dict(sampler=repr(sampler), adjoint=repr(adjoint), steps=n,
                             temp_bytes=int(temp),
                             R=_timed(grad, pb.params) / t_sample))
            print(rows[-1], flush=True)
    return rows


def _markdown(adaptive, rex):
    lines = [
        "Error-controlled grids (`aj.adaptive_time_grid`, rtol = atol = tol, float64; "
        "errors relative to the truth; the gradient is `aj.DTO()` on the grid):", "",
        "| problem | tableau | tol | accepted steps | x_0 error | ∂L/∂x_T error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in adaptive:
        lines.append(f"| {r['problem']} | `{r['tableau']}` | {r['tol']:.0e} | "
                     f"{r['steps']} | {r['x0_error']:.1e} | {r['grad_error']:.1e} |")
    lines += ["", "Reversible exponential Runge–Kutta on a random MLP (width 256, "
              "batch 64, float64): XLA temporary memory of the jitted gradient and R = "
              "gradient time / sampling time (this machine):", "",
              "| sampler | adjoint | N | temp memory | R |", "| --- | --- | --- | --- | --- |"]
    for r in rex:
        lines.append(f"| `{r['sampler']}` | `{r['adjoint']}` | {r['steps']} | "
                     f"{r['temp_bytes']:,} B | {r['R']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/frontier")
    p.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-5, 1e-7, 1e-9])
    p.add_argument("--tableaus", nargs="+", default=["bosh3", "dopri5", "tsit5"])
    p.add_argument("--rex-steps", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--rex-tableau", default="tsit5")
    args = p.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}", flush=True)
    adaptive = adaptive_rows(args.tols, args.tableaus)
    rex = rex_rows(args.rex_steps, args.rex_tableau)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "frontier.json"), "w") as f:
        json.dump(dict(adaptive=adaptive, rex=rex), f, indent=1)
    with open(os.path.join(args.out, "frontier.md"), "w") as f:
        f.write(_markdown(adaptive, rex))
    print(_markdown(adaptive, rex))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
