"""Peers, side by side: adjoint_jax against diffrax and torchdiffeq on the same
probability-flow ODE with the same model.

Claim checked: at equal gradient error (∂L/∂x_T) on the sharp Gaussian mixture,
adjoint_jax's best strategy is at least 5× faster than diffrax's `BacksolveAdjoint`
with adaptive Tsit5, no slower than diffrax's `RecursiveCheckpointAdjoint` on the same
fixed-step scheme, and faster than torchdiffeq's `odeint_adjoint` (the engine of the
AdjointDPM reference code) on CPU.

Every participant solves the probability-flow ODE in the exponential-integrator
variables y = x/α against ρ = σ/α,

    dy/dρ = ε_θ(α(ρ) y, t(ρ), c),       α(ρ) = (1 + ρ²)^(-1/2),

from ρ(t_start) down to ρ(t_end), with the same ε (the mixture's analytic ε, or the
MLP with its weights copied to PyTorch), the same x_T, the same loss on x_0 and the
same truth (`jax.grad` through a converged Dopri8 solve, rtol = atol = 1e-10, float64).
DPM-Solver-1 *is* Euler in (y, ρ), so diffrax's Euler on the sampler's log-SNR grid
(`StepTo`) is exactly `aj.DPMSolver1()`, and `RecursiveCheckpointAdjoint` through it is
`aj.DTO(checkpoints=...)` written with diffrax's general machinery.

Participants (gradient with respect to x_T, float64, jitted / torch eager):

- ours: a few (sampler, adjoint) pairs over N, measured by `adjoint_jax.bench.compare`;
- diffrax Euler / Heun / Tsit5 on the sampler's grid (`StepTo` in ρ) with
  `RecursiveCheckpointAdjoint`, over the same N (diffrax's `BacksolveAdjoint`
  cannot step a `StepTo` grid backwards);
- diffrax Tsit5 with constant steps in λ (the same log-SNR grid points) with
  `RecursiveCheckpointAdjoint` and `BacksolveAdjoint`, over the same N;
- diffrax Tsit5 with a PID controller in λ (faster than in ρ for diffrax on this
  problem) over a sweep of tolerances, both adjoints;
- torchdiffeq `odeint_adjoint`: `euler` on the same grid over N, `dopri5` over a
  sweep of tolerances.

For each peer the ratio (peer gradient time) / (our time at the same error) is read
off the lower envelope (Pareto front) of all our points, interpolated in log-log.

Run (a few minutes on 2 cores; install the extra first: `pip install -e ".[bench]"`):

    python benchmarks/peers.py --problem mixture --out docs/peers

`--quick` runs a reduced sweep (for a smoke test).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import adjoint_jax as aj  # noqa: E402
from adjoint_jax.bench import compare, make_problem  # noqa: E402
from adjoint_jax.bench._compare import errors  # noqa: E402
from adjoint_jax.bench._report import pareto_front  # noqa: E402


# ---- the ODE in (y, ρ) ----------------------------------------------------------
def rho_of_t(schedule, t):
    return jnp.exp(-schedule.lam(t))


def t_of_rho(schedule, rho):
    return schedule.t_of_lam(-jnp.log(rho))


def _median_time(fn, repeats, min_time=0.2):
    fn()  # warm-up
    times = []
    while len(times) < repeats or (sum(times) < min_time and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def diffrax_grad(
    problem,
    solver,
    adjoint,
    *,
    grid=None,
    num_steps=None,
    rtol=None,
    variable="lam",
    max_steps=16384,
):
    """A jitted ∂L/∂x_T through diffrax, in one of three step-size regimes:

    - `grid` (ρ values of the sampler's grid): `StepTo` on exactly those points, in
      s = −ρ (increasing), dy/ds = −ε; Euler is then DPM-Solver-1 exactly. diffrax's
      `BacksolveAdjoint` cannot run `StepTo` backwards; use `num_steps` for it.
    - `num_steps`: `ConstantStepSize` in λ = −log ρ, dy/dλ = −ρ ε: the same log-SNR
      grid points as the sampler, stepped by `solver` in λ.
    - `rtol` (= atol): a PID controller, in λ (`variable="lam"`) or in s = −ρ.
    """
    sch = problem.schedule
    t0, t1 = sch.t_max if problem.t_start is None else problem.t_start, problem.t_end
    rho0, rho1 = rho_of_t(sch, jnp.asarray(t0)), rho_of_t(sch, jnp.asarray(t1))
    alpha0, alpha1 = jnp.exp(sch.log_alpha(t0)), jnp.exp(sch.log_alpha(t1))

    def eps(rho, y, args):
        params, cond = args
        return problem.model(
            params, y / jnp.sqrt(1.0 + rho * rho), t_of_rho(sch, rho), cond
        )

    if grid is not None or variable == "rho":
        term = diffrax.ODETerm(lambda s, y, args: -eps(-s, y, args))
        span = (-rho0, -rho1)
    else:
        term = diffrax.ODETerm(
            lambda lam, y, args: -jnp.exp(-lam) * eps(jnp.exp(-lam), y, args)
        )
        span = (-jnp.log(rho0), -jnp.log(rho1))
    if grid is not None:
        controller, dt0 = diffrax.StepTo(ts=-grid), None
    elif num_steps is not None:
        controller, dt0 = diffrax.ConstantStepSize(), (span[1] - span[0]) / num_steps
    else:
        controller, dt0 = diffrax.PIDController(rtol=rtol, atol=rtol), None

    def loss(x_T):
        sol = diffrax.diffeqsolve(
            term,
            solver,
            t0=span[0],
            t1=span[1],
            dt0=dt0,
            y0=x_T / alpha0,
            args=(problem.params, problem.cond),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=max_steps,
        )
        return problem.loss(alpha1 * sol.ys[0])

    return jax.jit(jax.grad(loss))


# ---- torch -----------------------------------------------------------------------
def torch_eps(problem_name, problem, torch):
    """The problem's ε ported to PyTorch (float64), as a function of (y, ρ)."""
    sch = problem.schedule
    bmin, bmax = sch.beta_min, sch.beta_max
    p = {k: torch.tensor(np.asarray(v)) for k, v in problem.params.items()}
    cond = torch.tensor(np.asarray(problem.cond))

    def t_alpha(rho):
        big_l = 0.5 * torch.log1p(rho * rho)  # −log α
        t = 4.0 * big_l / (bmin + torch.sqrt(bmin**2 + 4.0 * (bmax - bmin) * big_l))
        a = torch.exp(-big_l)
        return t, a, rho * a

    if problem_name == "mixture":
        means = p["means"] + cond
        logw = torch.log_softmax(p["logits"], 0)

        def eps(rho, y):
            _, a, sg = t_alpha(rho)
            x = a * y
            v = a * a * p["stds"] ** 2 + sg * sg
            diff = x[..., None, :] - a * means
            logp = (
                logw
                - 0.5 * x.shape[-1] * torch.log(v)
                - 0.5 * (diff * diff).sum(-1) / v
            )
            r = torch.softmax(logp, -1)
            return sg * ((r / v)[..., None] * diff).sum(-2)

    elif problem_name == "mlp":

        def eps(rho, y):
            t, a, sg = t_alpha(rho)
            x = a * y
            lead = x.shape[:-1]
            emb = torch.stack(
                [torch.sin(t), torch.cos(t), torch.sin(3 * t), torch.cos(3 * t)]
            )
            h = torch.cat([x, cond.expand(*lead, -1), emb.expand(*lead, -1)], -1)
            h = torch.tanh(h @ p["w1"] + p["b1"])
            h = torch.tanh(h @ p["w2"] + p["b2"])
            return sg * x / (0.25 * a * a + sg * sg) + h @ p["w3"]

    else:
        raise ValueError(problem_name)
    return eps


def torchdiffeq_grad(problem_name, problem, method, *, grid=None, rtol=None):
    import torch
    import torchdiffeq

    torch.set_default_dtype(torch.float64)
    eps = torch_eps(problem_name, problem, torch)
    sch = problem.schedule
    t0 = sch.t_max if problem.t_start is None else problem.t_start
    alpha0 = float(jnp.exp(sch.log_alpha(t0)))
    alpha1 = float(jnp.exp(sch.log_alpha(problem.t_end)))
    w = torch.tensor(np.asarray([1.0, -2.0, 0.5, 1.5, -1.0, 0.75, -0.5, 2.0]))
    x_T = torch.tensor(np.asarray(problem.x_T))
    dim = x_T.shape[-1]
    w = w[torch.arange(dim) % 8]

    class Func(torch.nn.Module):
        def forward(self, rho, y):
            return eps(rho, y)

    func = Func()
    if grid is not None:
        ts = torch.tensor(np.asarray(grid))
        kw = dict(method=method)
    else:
        ts = torch.tensor(
            np.asarray(
                [
                    float(rho_of_t(sch, jnp.asarray(t0))),
                    float(rho_of_t(sch, jnp.asarray(problem.t_end))),
                ]
            )
        )
        kw = dict(method=method, rtol=rtol, atol=rtol)

    def grad():
        x = x_T.clone().requires_grad_(True)
        ys = torchdiffeq.odeint_adjoint(func, x / alpha0, ts, adjoint_params=(), **kw)
        x0 = alpha1 * ys[-1]
        scale = x0.numel() // x0.shape[-1]
        loss = ((w * torch.sin(x0)).sum() + 0.5 * (x0 * x0).sum()) / scale
        (g,) = torch.autograd.grad(loss, x)
        return g.detach().numpy()

    return grad


# ---- the run ---------------------------------------------------------------------
OURS = [
    (aj.DPMSolver1(), aj.DTO()),
    (aj.DPMSolver2(), aj.DTO()),
    (aj.DPMSolver2(), aj.DTO(checkpoints="steps")),
    (aj.DPMSolver2(), aj.AdjointDEIS(order=2)),
    (aj.DPMSolverPP(order=3), aj.DTO()),
    (aj.DPMSolverPP(order=3, third_order="taylor"), aj.DTO()),
    (aj.ReversibleHeun(), aj.ReversibleAdjoint()),
    (aj.McCallumFoster(aj.DPMSolver2()), aj.ReversibleAdjoint()),
]


def run(problem_name, steps, tols, batch, repeats, out, skip_torch=False):
    problem = make_problem(problem_name, batch=batch)
    truth = problem.truth(problem.params, problem.x_T, problem.cond)[1]
    rows = []

    def add(engine, method, adjoint, knob, g, t):
        rel, cos = errors(g, truth)
        rows.append(
            dict(
                engine=engine,
                method=method,
                adjoint=adjoint,
                knob=knob,
                rel_error=rel,
                cosine=cos,
                grad_time_s=t,
            )
        )
        print(
            f"  {engine:11s} {method:28s} {adjoint:28s} {knob:>10} "
            f"err {rel:9.2e}  {1e3 * t:9.3f} ms",
            flush=True,
        )

    print(f"problem {problem_name}, batch {batch}, gradient with respect to x_T")
    # ours
    recs = compare(
        problem, pairs=OURS, steps=steps, wrt=["xT"], repeats=repeats, min_time=0.2
    )
    for r in recs:
        rows.append(
            dict(
                engine="adjoint_jax",
                method=r["sampler"],
                adjoint=r["adjoint"],
                knob=f"N={r['steps']}",
                rel_error=r["rel_error"],
                cosine=r["cosine"],
                grad_time_s=r["grad_time_s"],
            )
        )
        print(
            f"  {'adjoint_jax':11s} {r['sampler']:28s} {r['adjoint']:28s} "
            f"{'N=' + str(r['steps']):>10} err {r['rel_error']:9.2e}  "
            f"{1e3 * r['grad_time_s']:9.3f} ms",
            flush=True,
        )

    # diffrax: fixed steps on our log-SNR grid, and adaptive
    sch = problem.schedule
    args = (problem.x_T,)
    rec, back = diffrax.RecursiveCheckpointAdjoint(), diffrax.BacksolveAdjoint()

    def measure(f, method, adjoint, knob):
        g = f(*args)
        t = _median_time(lambda: jax.block_until_ready(f(*args)), repeats)
        add("diffrax", method, type(adjoint).__name__, knob, g, t)

    for n in steps:
        grid = rho_of_t(sch, problem.ts(n))
        for solver in (diffrax.Euler(), diffrax.Heun(), diffrax.Tsit5()):
            f = diffrax_grad(problem, solver, rec, grid=grid)
            measure(f, f"{type(solver).__name__} (sampler grid, in ρ)", rec, f"N={n}")
        for adj in (rec, back):
            f = diffrax_grad(problem, diffrax.Tsit5(), adj, num_steps=n)
            measure(f, "Tsit5 (log-SNR steps, in λ)", adj, f"N={n}")
    for tol in tols:
        for adj in (rec, back):
            f = diffrax_grad(problem, diffrax.Tsit5(), adj, rtol=tol)
            measure(f, "Tsit5 (adaptive, PID, in λ)", adj, f"tol={tol:.0e}")

    # torchdiffeq
    if not skip_torch:
        import torch

        # The tensors are tiny: intra-op threads only add synchronisation.
        torch.set_num_threads(1)
        for n in steps:
            grid = np.asarray(rho_of_t(sch, problem.ts(n)))
            f = torchdiffeq_grad(problem_name, problem, "euler", grid=grid)
            g = f()
            add(
                "torchdiffeq",
                "euler (sampler grid, in ρ)",
                "odeint_adjoint",
                f"N={n}",
                g,
                _median_time(f, repeats),
            )
        for tol in tols:
            f = torchdiffeq_grad(problem_name, problem, "dopri5", rtol=tol)
            g = f()
            add(
                "torchdiffeq",
                "dopri5 (adaptive, in ρ)",
                "odeint_adjoint",
                f"tol={tol:.0e}",
                g,
                _median_time(f, 2, min_time=0.0),
            )

    summary = ratios(rows)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "peers.json"), "w") as fh:
        json.dump(
            dict(
                problem=problem_name,
                batch=batch,
                rows=_clean(rows),
                ratios=_clean(summary),
            ),
            fh,
            indent=1,
        )
    write_markdown(rows, summary, os.path.join(out, "peers.md"), problem_name, batch)
    plot(rows, os.path.join(out, "peers_pareto.png"), problem_name)
    print(open(os.path.join(out, "peers.md")).read())
    return rows, summary


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def _series(rows):
    out = {}
    for r in rows:
        out.setdefault((r["engine"], r["method"], r["adjoint"]), []).append(r)
    return out


USEFUL = 0.5  # errors above this are not gradients anyone would use


def _is_third_order(r):
    return r["engine"] == "adjoint_jax" and "order=3" in r["method"]


def ratios(rows, keep=lambda r: True):
    """For each peer series, (peer time) / (our time at the same error), our time read
    off the Pareto front of all our points (those `keep` accepts), interpolated
    linearly in log-log; only at errors ≤ `USEFUL`. `crossover` is the largest error
    at which the peer is faster than us, or reaches an error we do not reach."""
    ours = [
        (r["grad_time_s"], r["rel_error"])
        for r in rows
        if r["engine"] == "adjoint_jax"
        and keep(r)
        and r["rel_error"]
        and 0 < r["rel_error"] <= USEFUL
    ]
    front = pareto_front(ours)  # time increasing, error decreasing
    le = np.log([e for _, e in front])[::-1]
    lt = np.log([t for t, _ in front])[::-1]

    def our_time(err):
        x = math.log(err)
        if len(le) == 0 or x < le[0] or x > le[-1]:
            return math.nan
        return float(np.exp(np.interp(x, le, lt)))

    summary = []
    for (engine, method, adjoint), rs in _series(rows).items():
        if engine == "adjoint_jax":
            continue
        rr, wins = [], []
        for r in rs:
            e = r["rel_error"]
            if e and 0 < e <= USEFUL:
                ot = our_time(e)
                if math.isfinite(ot):
                    rr.append((e, r["grad_time_s"] / ot))
                    if r["grad_time_s"] < ot:
                        wins.append(e)
                elif len(le) and math.log(e) < le[0]:
                    wins.append(e)  # an error our points do not reach
        summary.append(
            dict(
                engine=engine,
                method=method,
                adjoint=adjoint,
                points=len(rr),
                ratio_median=statistics.median([q for _, q in rr]) if rr else math.nan,
                ratio_min=min([q for _, q in rr]) if rr else math.nan,
                ratio_max=max([q for _, q in rr]) if rr else math.nan,
                error_range=[min(e for e, _ in rr), max(e for e, _ in rr)]
                if rr
                else None,
                best_error=min(
                    (r["rel_error"] for r in rs if r["rel_error"]), default=math.nan
                ),
                crossover=max(wins, default=math.nan),
            )
        )
    return summary


def write_markdown(rows, summary, path, problem_name, batch):
    lines = [
        f"Peers on `{problem_name}` (batch {batch}, float64, ∂L/∂x_T; times are "
        "medians of jitted runs, torch eager):",
        "",
        "| engine | method | adjoint | knob | rel. error | time [ms] |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        e = r["rel_error"]
        lines.append(
            f"| {r['engine']} | `{r['method']}` | `{r['adjoint']}` | {r['knob']} "
            f"| {e:.2e} | {1e3 * r['grad_time_s']:.3f} |"
        )
    lines += [
        "",
        "Time of each peer divided by the time of our best strategy at the same error "
        "(> 1: we are faster; our time interpolated in log-log along the Pareto front "
        f"of all our points), over the peer's points with error ≤ {USEFUL} inside our "
        "error range:",
        "",
        "| peer | points | median ratio | range | errors compared |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        rng = "–" if not s["points"] else f"{s['ratio_min']:.1f}–{s['ratio_max']:.1f}"
        errs = (
            "none in our range"
            if not s["points"]
            else f"{s['error_range'][0]:.1e}…{s['error_range'][1]:.1e}"
        )
        med = "–" if not s["points"] else f"{s['ratio_median']:.1f}×"
        lines.append(
            f"| {s['engine']} `{s['method']}` + `{s['adjoint']}` | {s['points']} "
            f"| {med} | {rng} | {errs} |"
        )
    without = {
        (s["engine"], s["method"], s["adjoint"]): s
        for s in ratios(rows, keep=lambda r: not _is_third_order(r))
    }
    lines += [
        "",
        "Crossover: the largest gradient error at which the peer is faster than our "
        "best (or reaches an error we do not reach), against all our points and "
        "against our points without `DPMSolverPP(order=3)`:",
        "",
        "| peer | crossover | without third order |",
        "| --- | --- | --- |",
    ]
    for s in summary:
        w = without[(s["engine"], s["method"], s["adjoint"])]
        fmt = lambda v: "never" if not math.isfinite(v) else f"{v:.1e}"
        lines.append(
            f"| {s['engine']} `{s['method']}` + `{s['adjoint']}` "
            f"| {fmt(s['crossover'])} | {fmt(w['crossover'])} |"
        )
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def plot(rows, path, problem_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6.5))
    series = _series(rows)
    cmap = plt.get_cmap("tab20")
    for i, ((engine, method, adjoint), rs) in enumerate(series.items()):
        pts = sorted(
            (r["grad_time_s"], r["rel_error"])
            for r in rs
            if r["rel_error"] and r["rel_error"] > 0
        )
        if not pts:
            continue
        ours = engine == "adjoint_jax"
        ax.loglog(
            *zip(*pts),
            marker="o" if ours else "x",
            linestyle="-" if ours else "--",
            color=cmap(i % 20),
            label=f"{engine}: {method} + {adjoint}",
            linewidth=1.6 if ours else 1.0,
        )
    ours = [
        (r["grad_time_s"], r["rel_error"])
        for r in rows
        if r["engine"] == "adjoint_jax" and r["rel_error"] and r["rel_error"] > 0
    ]
    front = pareto_front(ours)
    if front:
        ax.loglog(
            *zip(*front),
            color="black",
            linewidth=3,
            alpha=0.3,
            label="adjoint_jax Pareto front",
            zorder=0,
        )
    ax.set_xlabel("gradient wall time [s] (median)")
    ax.set_ylabel("relative L2 error of dL/dx_T")
    ax.set_title(f"error against time, {problem_name}: adjoint_jax and peers (CPU)")
    ax.grid(True, which="both", alpha=0.3)
    finite = [r["rel_error"] for r in rows if r["rel_error"] and r["rel_error"] > 0]
    ax.set_ylim(bottom=min(finite) / 3, top=min(10.0, 3 * max(finite)))  # blow-ups off
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", default="mixture", choices=["mixture", "mlp"])
    p.add_argument("--steps", nargs="+", type=int, default=[8, 16, 32, 64, 128, 256])
    p.add_argument(
        "--tols", nargs="+", type=float, default=[1e-3, 1e-4, 1e-5, 1e-6, 1e-7]
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="docs/peers")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--quick", action="store_true", help="a reduced sweep (smoke test)")
    p.add_argument(
        "--from-json",
        metavar="PATH",
        help="re-make the table, ratios and figure from a peers.json",
    )
    a = p.parse_args(argv)
    if a.from_json:
        with open(a.from_json) as fh:
            data = json.load(fh)
        rows = [
            {k: (math.nan if v is None else v) for k, v in r.items()}
            for r in data["rows"]
        ]
        summary = ratios(rows)
        os.makedirs(a.out, exist_ok=True)
        write_markdown(
            rows,
            summary,
            os.path.join(a.out, "peers.md"),
            data["problem"],
            data["batch"],
        )
        plot(rows, os.path.join(a.out, "peers_pareto.png"), data["problem"])
        print(open(os.path.join(a.out, "peers.md")).read())
        return 0
    if a.quick:
        a.steps, a.tols, a.repeats = [8, 32], [1e-4], 2
    run(a.problem, a.steps, a.tols, a.batch, a.repeats, a.out, skip_torch=a.no_torch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
