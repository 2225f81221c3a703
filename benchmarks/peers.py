"""Peers, side by side: adjoint_jax against diffrax and torchdiffeq on the same
probability-flow ODE with the same model.

Claim checked: at equal gradient error (∂L/∂x_T) on the sharp Gaussian mixture,
adjoint_jax's best strategy is at least 5× faster than diffrax's `BacksolveAdjoint`
with adaptive Tsit5, no slower than diffrax's `RecursiveCheckpointAdjoint` on the same
fixed-step scheme, and faster than torchdiffeq's `odeint_adjoint` (the engine of the
AdjointDPM reference code) on CPU. On the network-dominated problem (`--problem
digits`, where the model's cost dominates every participant's, so that the time
ratios measure the strategies rather than the overheads) the claim put to the test is
"our Pareto front at or below every peer's at every error from 1e-1 to 1e-5"; the
report gives a per-peer verdict for that band, from the measurements, in time and in
NFE, and says where our front does not reach a peer's error. With the exponential
Runge–Kutta samplers (`aj.ExpRK`, fixed and error-controlled grids) the claim put to
the test on both problems is issue 24's: "our front at or below every peer's at every
gradient error from 1e-1 to 1e-5, in NFE and in time, and a memory-flat exact
strategy (`aj.McCallumFoster(aj.ExpRK(...))` + `aj.ReversibleAdjoint()`) on that
front within 1.5× of `DTO()`'s time at equal error"; the report's last tables give
that strategy's time and NFE against our DTO front at equal error.

Problems (`--problem`):

- `mixture`: a sharp Gaussian mixture, analytic ε (default);
- `mlp`: a random-weight MLP ε-network (weights copied to PyTorch);
- `digits`: the shipped trained digits ε-network (`aj.zoo.digits()`: a conv ResNet
  with GroupNorm and FiLM, ~190k weights), batch 8 of 8×8 images, class-conditional,
  everything cast to float64, ported to PyTorch layer by layer (`torch_eps`). The loss
  is the same nonlinear loss as for the other problems (not the classifier's).

Every participant solves the probability-flow ODE in the exponential-integrator
variables y = x/α against ρ = σ/α,

    dy/dρ = ε_θ(α(ρ) y, t(ρ), c),       α(ρ) = (1 + ρ²)^(-1/2),

from ρ(t_start) down to ρ(t_end), with the same ε, the same x_T, the same loss on x_0
and the same truth (`jax.grad` through a converged Dopri8 solve, rtol = atol = 1e-10,
float64; for digits, which has none built in, diffrax's Dopri8 in λ with
`RecursiveCheckpointAdjoint`, checked against rtol = 1e-9). DPM-Solver-1 *is* Euler in
(y, ρ), so diffrax's Euler on the sampler's log-SNR grid (`StepTo`) is exactly
`aj.DPMSolver1()`, and `RecursiveCheckpointAdjoint` through it is
`aj.DTO(checkpoints=...)` written with diffrax's general machinery.

Before timing anything the run checks the PyTorch port against JAX in float64 and
stops if it drifts (`check_parity`: ε at a few (y, ρ) to 1e-10, the loss, the
gradient through `euler` on the sampler's grid, torchdiffeq `odeint` against diffrax
`Euler` + `RecursiveCheckpointAdjoint`, and torchdiffeq `odeint_adjoint` against
diffrax `BacksolveAdjoint`, both to 1e-9). `--check` runs only these checks and the
truth's convergence check.

Participants (gradient with respect to x_T, float64, jitted / torch eager):

- ours: a few (sampler, adjoint) pairs over N on the log-SNR grid, measured by
  `adjoint_jax.bench.compare` (on digits only the candidates for the front,
  `OURS_FRONT`; `--all-pairs`: all): the multistep `DPMSolver2`, `DPMSolverPP(order=3)`
  (and on the mixture the rest of `OURS`) with `DTO()`, and the single-step
  exponential Runge–Kutta `ExpRK("dpm3")`, `ExpRK("tsit5")` (and on the mixture
  `"rk4"`, `"dopri5"`) with `DTO()` and the memory-flat exact
  `McCallumFoster(ExpRK("tsit5"))` + `ReversibleAdjoint()`; the Runge–Kutta pairs
  over their own, smaller N (`ExpRK("tsit5")` makes 6 evaluations a step: N = 4 … 64);
- ours, error-controlled (`adaptive_points`): for each of `our_tols`,
  `aj.adaptive_time_grid(sampler=aj.ExpRK("tsit5"), rtol=atol=tol)` (a forward solve
  with the embedded error estimate and a PID controller in log-SNR, no gradient),
  then the gradient through `aj.sample` on that grid with `ExpRK("tsit5")` + `DTO()`
  and `McCallumFoster(ExpRK("tsit5"))` + `ReversibleAdjoint()`. **The grid is charged
  to the gradient**: the time is that of (grid + gradient) run back to back, the NFE
  the grid's evaluations (7 per attempted step of tsit5's `advance_with_error`,
  rejected attempts included) plus the gradient's evaluations and VJPs on the
  accepted grid; the grid has the static length `max_steps` (zero-length padding
  steps, no evaluation), so the sweep compiles once. The report lists each grid's
  accepted and attempted steps;
- diffrax Euler / Heun / Tsit5 on the sampler's grid (`StepTo` in ρ) with
  `RecursiveCheckpointAdjoint`, over N (diffrax's `BacksolveAdjoint` cannot step a
  `StepTo` grid backwards);
- diffrax Tsit5 with constant steps in λ (the same log-SNR grid points) with
  `RecursiveCheckpointAdjoint` and `BacksolveAdjoint`, over N;
- diffrax Tsit5 with a PID controller in λ (faster than in ρ for diffrax on this
  problem) over a sweep of tolerances, both adjoints;
- torchdiffeq `odeint_adjoint`: `euler` on the same grid over N, `dopri5` over a
  sweep of tolerances.

The sweeps (our N, the peers' N, the tolerances, the repeats, torch's threads) are
per problem (`DEFAULTS`; each can be overridden on the command line).

For each peer the ratio (peer gradient time) / (our time at the same error) is read
off the lower envelope (Pareto front) of all our points, interpolated in log-log; the
same in NFE. NFE = model evaluations (re-evaluations in a backward pass included) +
model VJPs, counted alike for every JAX participant (`_our_nfe`, `measure`,
`adaptive_points`) and for torchdiffeq (calls of its dynamics).

Run (install the extra first: `pip install -e ".[bench]"`; on 2 cores the mixture
takes about 18 minutes, nearly all of it compilation of its ~90 points; the digits
sweep with the Runge–Kutta pairs and adaptive grids takes over 25 minutes — not yet
measured to the end on a quiet machine):

    python benchmarks/peers.py --problem mixture --out docs/peers
    python benchmarks/peers.py --problem digits --peer-convs canonical \
        --out docs/peers_digits_canonical
    python benchmarks/peers.py --problem digits --torch-threads 1 --out docs/peers_digits

`--quick` runs a reduced sweep (for a smoke test). Timings depend on the machine's
load: torch with two intra-op threads in particular slows down by an order of
magnitude when another process keeps a core busy (`--torch-threads 1` then).
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import adjoint_jax as aj  # noqa: E402
from adjoint_jax._convs import canonical_convs  # noqa: E402
from adjoint_jax.bench import EvalCount, compare, make_problem  # noqa: E402
from adjoint_jax.bench._compare import errors  # noqa: E402
from adjoint_jax.bench._problem import _nonlinear_loss, _weights  # noqa: E402
from adjoint_jax.bench._count import counting_model  # noqa: E402
from adjoint_jax.bench._report import pareto_front  # noqa: E402


# ---- the ODE in (y, ρ) ----------------------------------------------------------
def rho_of_t(schedule, t):
    return jnp.exp(-schedule.lam(t))


def t_of_rho(schedule, rho):
    return schedule.t_of_lam(-jnp.log(rho))


def _median_time(fn, repeats, min_time=0.2, warmup=True, max_time=math.inf):
    """Median wall time of `fn()`: at least one run, `repeats` runs unless they
    add up to `max_time` seconds first, and enough to fill `min_time`."""
    if warmup:
        fn()
    times = []
    while (
        not times
        or (len(times) < repeats and sum(times) < max_time)
        or (sum(times) < min_time and len(times) < 200)
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def jax_eps(problem):
    """The problem's ε as a function of (ρ, y, (params, cond)): what every JAX
    participant integrates (dy/dρ = ε)."""
    sch = problem.schedule

    def eps(rho, y, args):
        params, cond = args
        return problem.model(
            params, y / jnp.sqrt(1.0 + rho * rho), t_of_rho(sch, rho), cond
        )

    return eps


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
    eps = jax_eps(problem)

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


# ---- problems --------------------------------------------------------------------
# Our (sampler, adjoint) pairs on fixed log-SNR grids. An entry may carry its own N
# (a third element): the single-step exponential Runge–Kutta samplers spend 3–6
# evaluations a step, so they sweep smaller N than the multistep ones (`--steps` or
# `--quick` replaces every entry's N).
_EXP_STEPS = [4, 8, 16, 32, 64]  # ExpRK("tsit5") / McCallumFoster(ExpRK("tsit5"))
OURS = [
    (aj.DPMSolver1(), aj.DTO()),
    (aj.DPMSolver2(), aj.DTO()),
    (aj.DPMSolver2(), aj.DTO(checkpoints="steps")),
    (aj.DPMSolver2(), aj.AdjointDEIS(order=2)),
    (aj.DPMSolverPP(order=3), aj.DTO()),
    (aj.DPMSolverPP(order=3, third_order="taylor"), aj.DTO()),
    (aj.ReversibleHeun(), aj.ReversibleAdjoint()),
    (aj.McCallumFoster(aj.DPMSolver2()), aj.ReversibleAdjoint()),
    (aj.ExpRK("dpm3"), aj.DTO()),
    (aj.ExpRK("rk4"), aj.DTO(), [4, 8, 16, 32, 64, 128]),
    (aj.ExpRK("dopri5"), aj.DTO(), _EXP_STEPS),
    (aj.ExpRK("tsit5"), aj.DTO(), _EXP_STEPS),
    (aj.McCallumFoster(aj.ExpRK("tsit5")), aj.ReversibleAdjoint(), _EXP_STEPS),
]
# On digits each pair costs minutes, and every other pair of `OURS` was dominated
# wherever we measured it (N = 8, 32, and 128, 512 for the third orders): the same
# error at more time (DTO(checkpoints="steps"), McCallumFoster(DPMSolver2())) or more
# error at about the same time (DPMSolver1, AdjointDEIS(order=2), ReversibleHeun,
# DPMSolverPP(order=3, third_order="taylor")). Only the candidates for the front run
# by default there; `--all-pairs` runs all of `OURS`.
OURS_FRONT = [
    (aj.DPMSolver2(), aj.DTO()),
    (aj.DPMSolverPP(order=3), aj.DTO()),
    (aj.ExpRK("dpm3"), aj.DTO(), [16, 32, 64, 128]),
    (aj.ExpRK("tsit5"), aj.DTO(), _EXP_STEPS),
    (aj.McCallumFoster(aj.ExpRK("tsit5")), aj.ReversibleAdjoint(), _EXP_STEPS),
]
# Our error-controlled grids: `aj.adaptive_time_grid(..., sampler=ADAPTIVE_GRID)` at
# rtol = atol = each of `our_tols`, then `aj.sample` on that grid with each pair.
ADAPTIVE_GRID = aj.ExpRK("tsit5")
ADAPTIVE_PAIRS = [
    (aj.ExpRK("tsit5"), aj.DTO()),
    (aj.McCallumFoster(aj.ExpRK("tsit5")), aj.ReversibleAdjoint()),
]

# Per-problem defaults: `batch`; `steps` (our N, for the pairs without their own);
# `peer_steps` (the N of the peers' fixed-step series; None: `steps`); `tols` (the
# peers' adaptive tolerances); `our_tols` (the tolerances of our adaptive grids);
# `max_steps` (our adaptive grids' static length: accepted steps at most; the padding
# is zero-length steps); `repeats` (timed runs); `max_time` (a peer's timed runs
# stop once they add up to this many seconds, after at least one run past the
# warm-up); `ours` (our pairs);
# `torch_threads`: torch's intra-op threads (None: torch's default). The mixture's and
# the MLP's tensors are tiny, so extra threads only add synchronisation: one. The
# digits network's convolutions are worth parallelising: torch's default (the
# physical cores, 2 here; on a loaded machine two threads can be far slower than one,
# see `--torch-threads`);
# `torch_step_t`: make torchdiffeq's adaptive solver step exactly onto the end point
# ρ(t_end) instead of stepping past it and interpolating back: the digits network
# embeds λ = −log ρ, undefined for ρ ≤ 0, and ρ(t_end) ≈ 0.01 is close to 0.
#
# The mixture and the MLP are cheap: wide sweeps. The digits ε-network (a conv ResNet,
# ~190k weights, batch 8) dominates every participant's cost, and its λ-embedding
# (frequencies up to 8 over λ ∈ [−5, 4.6]) is resolved only from N ≈ 100 by the
# multistep solvers: they reach ~2e-4 at N = 512 (~1e-5 would take N of several
# thousand), the Tsit5 tableau (ours or the peers') ~2e-5 at N = 32 (6 evaluations a
# step). The sweep keeps a full run to about a quarter of an hour on 2 CPU cores;
# widen it with --steps / --tols / --our-tols.
_WIDE = dict(
    batch=16,
    steps=[8, 16, 32, 64, 128, 256],
    peer_steps=None,  # = steps
    tols=[1e-3, 1e-4, 1e-5, 1e-6, 1e-7],
    our_tols=[1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8],
    max_steps=64,  # tsit5 accepts 51 steps at 1e-8 on the mixture
    repeats=5,
    max_time=math.inf,
    ours=OURS,
    torch_threads=1,
    torch_step_t=False,
)
DEFAULTS = {
    "mixture": _WIDE,
    "mlp": _WIDE,
    "digits": dict(
        batch=8,
        # (DPMSolver2 / DPMSolverPP(order=3) at N = 512 are off the front since
        # ExpRK; the grids' padding is computed under DTO: max_steps kept tight.)
        steps=[32, 64, 128, 256],
        peer_steps=[8, 16, 32],
        tols=[1e-3, 1e-4, 1e-5, 1e-6, 1e-7],
        our_tols=[1e-3, 1e-4, 1e-5, 1e-6],
        max_steps=48,
        repeats=3,
        max_time=2.0,
        ours=OURS_FRONT,
        torch_threads=None,
        torch_step_t=True,
    ),
}
QUICK = dict(steps=[8, 32], peer_steps=[8, 32], tols=[1e-4], our_tols=[1e-4], repeats=2)
TRUTH_RTOL, TRUTH_CHECK_RTOL = 1e-10, 1e-9  # Dopri8 truth, and its convergence check
TRUTH_CONVERGED = 1e-7  # largest relative change between the two accepted
PARITY_EPS, PARITY_LOSS, PARITY_GRAD = 1e-10, 1e-12, 1e-9  # torch against JAX


def _f64_leaves(tree):
    return jax.tree_util.tree_map(
        lambda a: (
            jnp.asarray(a, jnp.float64)
            if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
            else a
        ),
        tree,
    )


def digits_problem(batch):
    """The shipped trained digits ε-network (`aj.zoo.digits()`) in float64 throughout:
    its weights cast to float64 (the network computes in its weights' dtype), x_T of
    shape (batch, 8, 8) and the class embeddings in float64, and the nonlinear loss of
    the other problems (the same one the torch side computes) instead of the
    classifier's cross-entropy. No closed form: the truth is `converged_truth`."""
    base = make_problem("digits", batch=batch, dtype=jnp.float64)
    problem = dataclasses.replace(
        base,
        params=_f64_leaves(base.params),
        x_T=jnp.asarray(base.x_T, jnp.float64),
        cond=jnp.asarray(base.cond, jnp.float64),
        loss=_nonlinear_loss(_weights(base.x_T.shape[-1], jnp.float64)),
        truth=None,
    )
    net = eqx.combine(problem.params, problem.model.static)
    assert net._dtype() == jnp.float64, net._dtype()
    return problem


def converged_truth(problem):
    """∂L/∂x_T through diffrax's Dopri8 (PID in λ, rtol = atol = `TRUTH_RTOL`,
    `RecursiveCheckpointAdjoint`), checked against the same at `TRUTH_CHECK_RTOL`:
    returns (truth, relative difference); raises if they differ by more than
    `TRUTH_CONVERGED`."""
    grads = []
    for rtol in (TRUTH_RTOL, TRUTH_CHECK_RTOL):
        f = diffrax_grad(
            problem,
            diffrax.Dopri8(),
            diffrax.RecursiveCheckpointAdjoint(),
            rtol=rtol,
            max_steps=65536,
        )
        grads.append(np.asarray(f(problem.x_T)))
    change = errors(grads[0], grads[1])[0]
    if not change <= TRUTH_CONVERGED:
        raise RuntimeError(
            f"the Dopri8 truth is not converged: rtol {TRUTH_RTOL:.0e} and "
            f"{TRUTH_CHECK_RTOL:.0e} differ by {change:.2e} (relative) > "
            f"{TRUTH_CONVERGED:.0e}"
        )
    return grads[0], change


def build_problem(problem_name, batch):
    if problem_name == "digits":
        return digits_problem(batch)
    return make_problem(problem_name, batch=batch)


# ---- torch -----------------------------------------------------------------------
def torch_eps(problem_name, problem, torch):
    """The problem's ε ported to PyTorch (float64), as a function of (y, ρ)."""
    sch = problem.schedule
    bmin, bmax = sch.beta_min, sch.beta_max
    cond = torch.tensor(np.asarray(problem.cond, np.float64))
    if problem_name == "digits":
        return _torch_digits_eps(problem, cond, torch)
    p = {k: torch.tensor(np.asarray(v)) for k, v in problem.params.items()}

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


def _torch_digits_eps(problem, cond, torch):
    """`DigitsEpsNet` (`adjoint_jax/zoo/_digits.py`) in PyTorch, float64, NCHW, with
    the same weights: convolutions HWIO → OIHW ("SAME" = padding 1), the same
    GroupNorm (biased variance over H, W and the channels of a group, eps 1e-5), FiLM
    and noise embedding. The network embeds the log-SNR λ(t), which in (y, ρ) is
    λ = −log ρ: no t needed."""
    F = torch.nn.functional
    net = eqx.combine(problem.params, problem.model.static)

    def tt(a):
        return torch.tensor(np.asarray(a, np.float64))

    def dense(m):
        w, b = tt(m.weight), tt(m.bias)
        return lambda x: x @ w + b

    def conv(m):
        w, b = tt(m.weight).permute(3, 2, 0, 1).contiguous(), tt(m.bias)
        return lambda x: F.conv2d(x, w, b, padding=1)

    def group_norm(m):
        scale, shift, groups = (
            tt(m.scale)[:, None, None],
            tt(m.shift)[:, None, None],
            m.groups,
        )

        def f(x):
            b, c, h, w = x.shape
            g = x.reshape(b, groups, c // groups, h, w)
            mean = g.mean(dim=(2, 3, 4), keepdim=True)
            var = ((g - mean) ** 2).mean(dim=(2, 3, 4), keepdim=True)
            g = ((g - mean) * torch.rsqrt(var + 1e-5)).reshape(b, c, h, w)
            return g * scale + shift

        return f

    silu = F.silu
    # As in `DigitsEpsNet.embed_noise`: frequencies 1/8 … 8, geometric.
    freqs = tt(np.exp(np.linspace(math.log(0.125), math.log(8.0), net.num_freqs)))
    noise0, noise1 = dense(net.noise_mlp[0]), dense(net.noise_mlp[1])
    cond_emb = dense(net.cond_proj)(cond)  # the conditioning is fixed
    conv_in, norm_out, conv_out = (
        conv(net.conv_in),
        group_norm(net.norm_out),
        conv(net.conv_out),
    )
    blocks = [
        (
            group_norm(blk.norm1),
            conv(blk.conv1),
            dense(blk.film),
            group_norm(blk.norm2),
            conv(blk.conv2),
        )
        for blk in net.blocks
    ]

    def eps(rho, y):  # y (B, 8, 8), ρ a scalar
        x = y * torch.rsqrt(1.0 + rho * rho)
        lam = (-torch.log(rho)).expand(x.shape[0])[:, None]  # (B, 1)
        arg = lam * freqs
        feats = torch.cat([torch.sin(arg), torch.cos(arg), lam / 8.0], -1)
        emb = silu(noise1(silu(noise0(feats))) + cond_emb)
        h = conv_in(x[:, None])
        for norm1, conv1, film, norm2, conv2 in blocks:
            z = conv1(silu(norm1(h)))
            scale, shift = film(emb)[:, :, None, None].chunk(2, dim=1)
            z = norm2(z) * (1.0 + scale) + shift
            h = h + conv2(silu(z))
        return conv_out(silu(norm_out(h)))[:, 0]

    return eps


def torch_loss(x0, torch):
    """The torch side's loss: `_nonlinear_loss` of `adjoint_jax.bench._problem`
    ((Σ w·sin(x0) + ½ Σ x0²) / scale, w of length 8 over the last axis)."""
    w = torch.tensor(np.asarray([1.0, -2.0, 0.5, 1.5, -1.0, 0.75, -0.5, 2.0]))
    w = w[torch.arange(x0.shape[-1]) % 8]
    scale = x0.numel() // x0.shape[-1]
    return ((w * torch.sin(x0)).sum() + 0.5 * (x0 * x0).sum()) / scale


def torchdiffeq_grad(
    problem_name,
    problem,
    method,
    *,
    grid=None,
    rtol=None,
    num_steps=None,
    adjoint=True,
):
    """∂L/∂x_T through torchdiffeq in (y, ρ), torch eager, float64: on the sampler's
    grid (`grid`, ρ values), with `num_steps` constant steps in ρ, or adaptive at
    rtol = atol = `rtol`. `adjoint=True`: `odeint_adjoint` (the continuous adjoint,
    solved backwards with the same method and backsolve: the benchmarked peer);
    `adjoint=False`: backpropagation through `odeint` (only for the parity check)."""
    import torch
    import torchdiffeq

    torch.set_default_dtype(torch.float64)
    eps = torch_eps(problem_name, problem, torch)
    sch = problem.schedule
    t0 = sch.t_max if problem.t_start is None else problem.t_start
    alpha0 = float(jnp.exp(sch.log_alpha(t0)))
    alpha1 = float(jnp.exp(sch.log_alpha(problem.t_end)))
    x_T = torch.tensor(np.asarray(problem.x_T))

    counts = dict(evals=0, vjps=0)

    class Func(torch.nn.Module):
        # odeint_adjoint evaluates the dynamics without autograd in its forward
        # solve, and with it (then one torch.autograd.grad) in its backward solve:
        # a call with autograd on is one model VJP.
        def forward(self, rho, y):
            counts["vjps" if torch.is_grad_enabled() else "evals"] += 1
            return eps(rho, y)

    func = Func()
    if grid is not None:
        ts = torch.tensor(np.asarray(grid))
        kw = dict(method=method)
    else:
        rho0 = float(rho_of_t(sch, jnp.asarray(t0)))
        rho1 = float(rho_of_t(sch, jnp.asarray(problem.t_end)))
        ts = torch.tensor([rho0, rho1])
        if num_steps is not None:
            kw = dict(method=method, options=dict(step_size=(rho0 - rho1) / num_steps))
        else:
            kw = dict(method=method, rtol=rtol, atol=rtol)
            if DEFAULTS[problem_name]["torch_step_t"]:
                kw["options"] = dict(step_t=ts[1:])
    if adjoint:
        solve = lambda y0: torchdiffeq.odeint_adjoint(  # noqa: E731
            func, y0, ts, adjoint_params=(), **kw
        )
    else:
        solve = lambda y0: torchdiffeq.odeint(func, y0, ts, **kw)  # noqa: E731

    def grad():
        counts.update(evals=0, vjps=0)
        x = x_T.clone().requires_grad_(True)
        ys = solve(x / alpha0)
        (g,) = torch.autograd.grad(torch_loss(alpha1 * ys[-1], torch), x)
        grad.nfe = counts["evals"] + counts["vjps"]
        return g.detach().numpy()

    return grad


def check_parity(problem_name, problem, num_steps=8):
    """The torch port against JAX, in float64. Returns the relative differences of

    - `eps`: ε at a few (y, ρ) (largest over them);
    - `loss`: the loss at one x_0;
    - `euler_grad`: backpropagation through torchdiffeq's `euler` (`odeint`) against
      diffrax's `Euler` + `RecursiveCheckpointAdjoint`, both on the sampler's
      `num_steps`-step grid (`StepTo`): the same discrete map and its exact gradient;
    - `euler_adjoint`: torchdiffeq's `odeint_adjoint` (the peer's own machinery)
      against diffrax's `BacksolveAdjoint`, both `euler` with 4·`num_steps` constant
      steps in ρ: the same continuous adjoint, discretised alike. (On the sampler's
      grid `odeint_adjoint` is *not* the discrete gradient: it re-solves y backwards,
      so it is compared with the truth in the table, not here.)

    Raises `RuntimeError` if any exceeds its bound (`PARITY_*`)."""
    import torch

    torch.set_default_dtype(torch.float64)
    sch = problem.schedule
    t0 = sch.t_max if problem.t_start is None else problem.t_start
    t_eps = torch_eps(problem_name, problem, torch)
    j_eps = jax.jit(jax_eps(problem))
    args = (problem.params, problem.cond)
    x = np.asarray(problem.x_T)
    noise = np.asarray(jax.random.normal(jax.random.key(7), x.shape, jnp.float64))
    eps_diff = 0.0
    for t in (t0, 0.5, 0.05, problem.t_end):
        rho = float(rho_of_t(sch, jnp.asarray(t)))
        for xx in (x, 0.5 * x + noise):
            y = xx * math.sqrt(1.0 + rho * rho)  # x = α y of order one
            ej = np.asarray(j_eps(jnp.asarray(rho), jnp.asarray(y), args))
            et = t_eps(torch.tensor(rho), torch.tensor(y)).numpy()
            eps_diff = max(eps_diff, errors(et, ej)[0])
    lj = float(problem.loss(jnp.asarray(x + noise)))
    lt = float(torch_loss(torch.tensor(x + noise), torch))
    loss_diff = abs(lj - lt) / abs(lj)
    rec, back = diffrax.RecursiveCheckpointAdjoint(), diffrax.BacksolveAdjoint()
    grid = rho_of_t(sch, problem.ts(num_steps))
    gj = diffrax_grad(problem, diffrax.Euler(), rec, grid=grid)(problem.x_T)
    gt = torchdiffeq_grad(
        problem_name, problem, "euler", grid=np.asarray(grid), adjoint=False
    )()
    grad_diff = errors(gt, gj)[0]
    n = 4 * num_steps
    gj = diffrax_grad(problem, diffrax.Euler(), back, num_steps=n, variable="rho")(
        problem.x_T
    )
    gt = torchdiffeq_grad(problem_name, problem, "euler", num_steps=n)()
    adj_diff = errors(gt, gj)[0]
    out = dict(
        eps=eps_diff,
        loss=loss_diff,
        euler_grad=grad_diff,
        euler_adjoint=adj_diff,
        steps=num_steps,
    )
    print(
        f"parity torch/JAX ({problem_name}, float64, relative): ε {eps_diff:.1e}, "
        f"loss {loss_diff:.1e}, euler gradient on the {num_steps}-step grid "
        f"{grad_diff:.1e}, euler odeint_adjoint/BacksolveAdjoint ({n} steps in ρ) "
        f"{adj_diff:.1e}",
        flush=True,
    )
    failed = [
        f"{what} differs by {d:.2e} > {bound:.0e}"
        for what, d, bound in (
            ("ε", eps_diff, PARITY_EPS),
            ("the loss", loss_diff, PARITY_LOSS),
            (
                f"the euler gradient on the {num_steps}-step grid",
                grad_diff,
                PARITY_GRAD,
            ),
            ("odeint_adjoint against BacksolveAdjoint", adj_diff, PARITY_GRAD),
        )
        if not d <= bound
    ]
    if failed:
        raise RuntimeError(
            f"the PyTorch port of the {problem_name} problem does not match JAX "
            "(relative differences, float64): "
            + "; ".join(failed)
            + ". Fix `torch_eps` / `torch_loss` / `torchdiffeq_grad` in "
            "benchmarks/peers.py before comparing timings."
        )
    return out


# ---- ours: pairs with their N, and error-controlled grids ----------------------------
def _entry(e):
    """(sampler, adjoint, N or None) of an entry of `OURS` (None: the run's `steps`)."""
    s, a, *rest = e
    return s, a, (tuple(rest[0]) if rest and rest[0] is not None else None)


def _pair_groups(pairs, steps):
    """[(N, [(sampler, adjoint), …]), …]: the pairs grouped by the N they run at, in
    the order of `pairs` (one `compare` call each)."""
    groups = {}
    for s, a, n in map(_entry, pairs):
        groups.setdefault(tuple(steps) if n is None else n, []).append((s, a))
    return [(list(n), g) for n, g in groups.items()]


def adaptive_points(problem, truth, tols, repeats, max_steps, pairs, grid=ADAPTIVE_GRID):
    """Our error-controlled points: for each rtol = atol = `tol`,
    `aj.adaptive_time_grid(..., sampler=grid, max_steps=max_steps)` (a forward solve
    with the embedded error estimate, no gradient), then ∂L/∂x_T through `aj.sample`
    on that grid with each (sampler, adjoint) of `pairs`.

    Everything is charged to the gradient: its time is the median of (grid + jitted
    gradient on it) together, its NFE the grid's evaluations (every attempted step,
    rejected ones included: 7 for tsit5's `advance_with_error`) plus the gradient's
    evaluations and VJPs on the accepted grid, both counted by running the model
    wrapped in the counter (the grid's count divided by the evaluations per attempt
    gives the attempts). The grid has the static length `max_steps`: its padding is
    zero-length steps (the identity, no evaluation) inside the same compiled
    gradient, whatever the tolerance (one compilation for the sweep)."""
    from adjoint_jax._samplers._tableaus import TABLEAUS

    sch, params, x_T, cond = problem.schedule, problem.params, problem.x_T, problem.cond
    per_try = TABLEAUS[grid.tableau].error_stages  # evaluations per attempted step

    def grid_fn(model):
        def g(x, tol):
            return aj.adaptive_time_grid(
                model, params, x, cond, schedule=sch, sampler=grid, rtol=tol,
                atol=tol, max_steps=max_steps, t_start=problem.t_start,
                t_end=problem.t_end,
            )
        return g

    def grad_fn(model, sampler, adjoint):
        def loss(p, x, c, ts):
            return problem.loss(aj.sample(model, p, x, c, schedule=sch, ts=ts,
                                          sampler=sampler, adjoint=adjoint))
        return jax.grad(loss, argnums=1)

    count = EvalCount()
    counted = counting_model(problem.model, count)  # one object: one compilation
    plain_grid, counted_grid = grid_fn(problem.model), grid_fn(counted)
    ts0, _ = plain_grid(x_T, tols[0])
    compiled = {}
    for sampler, adjoint in pairs:
        args = (params, x_T, cond, ts0)
        c = jax.jit(grad_fn(problem.model, sampler, adjoint)).lower(*args).compile()
        mem = c.memory_analysis()
        cc = jax.jit(grad_fn(counted, sampler, adjoint)).lower(*args).compile()
        compiled[(sampler, adjoint)] = (c, cc, -1 if mem is None else mem.temp_size_in_bytes)

    out = []
    for tol in tols:
        try:
            ts, n = jax.block_until_ready(plain_grid(x_T, tol))
        except Exception as err:  # eqx.error_if: t_end not reached in max_steps
            print(f"  adjoint_jax adaptive grid tol={tol:.0e}: {err}".split("\n")[0],
                  flush=True)
            continue
        count.forward = count.vjp = 0
        jax.block_until_ready(counted_grid(x_T, tol))
        jax.effects_barrier()
        grid_nfe = count.forward
        grid_time = _median_time(
            lambda: jax.block_until_ready(plain_grid(x_T, tol)), repeats
        )
        for sampler, adjoint in pairs:
            c, cc, temp = compiled[(sampler, adjoint)]
            count.forward = count.vjp = 0
            jax.block_until_ready(cc(params, x_T, cond, ts))
            jax.effects_barrier()
            grad_nfe = count.forward + count.vjp

            def total():
                ts_, _ = plain_grid(x_T, tol)
                return jax.block_until_ready(c(params, x_T, cond, ts_))

            g = total()
            t = _median_time(total, repeats, warmup=False)
            rel, cos = errors(g, truth)
            row = dict(
                engine="adjoint_jax",
                method=f"{sampler!r} (adaptive grid)",
                adjoint=repr(adjoint),
                knob=f"tol={tol:.0e}",
                rel_error=rel,
                cosine=cos,
                grad_time_s=t,
                nfe=grid_nfe + grad_nfe,
                temp_bytes=int(temp),
                grid_steps=int(n),
                grid_attempts=grid_nfe / per_try,
                grid_nfe=grid_nfe,
                grid_time_s=grid_time,
            )
            out.append(row)
            print(
                f"  {'adjoint_jax':11s} {row['method']:28s} {row['adjoint']:28s} "
                f"{row['knob']:>10} err {rel:9.2e}  {1e3 * t:9.3f} ms  NFE "
                f"{row['nfe']} (grid: {int(n)} steps accepted of "
                f"{grid_nfe / per_try:.0f} tried, {grid_nfe} NFE, "
                f"{1e3 * grid_time:.1f} ms)",
                flush=True,
            )
    return out


# ---- the run ---------------------------------------------------------------------
def run(
    problem_name,
    steps,
    tols,
    batch,
    repeats,
    out,
    skip_torch=False,
    *,
    peer_steps=None,
    pairs=OURS,
    max_time=math.inf,
    torch_threads=None,
    peer_convs="as-written",
    our_tols=(),
    max_steps=128,
    adaptive_pairs=ADAPTIVE_PAIRS,
):
    """The whole comparison; `peer_steps` (default: `steps`) are the N of the peers'
    fixed-step series, `pairs` our (sampler, adjoint[, N]) pairs (N default:
    `steps`), `our_tols` the tolerances of our adaptive grids (`max_steps` long, each
    used by every pair of `adaptive_pairs`), `torch_threads` torch's intra-op threads
    (None: torch's default), `peer_convs` how diffrax sees the model's convolutions
    (see `--peer-convs`)."""
    peer_steps = steps if peer_steps is None else peer_steps
    t_run = time.perf_counter()
    problem = build_problem(problem_name, batch)
    print(f"problem {problem_name}, batch {batch}, gradient with respect to x_T")
    checks = {}
    if not skip_torch:
        checks["parity"] = check_parity(problem_name, problem)
    if problem.truth is not None:
        truth = np.asarray(problem.truth(problem.params, problem.x_T, problem.cond)[1])
        checks["truth"] = dict(kind="the problem's own (make_problem)")
    else:
        t_truth = time.perf_counter()
        truth, change = converged_truth(problem)
        checks["truth"] = dict(
            kind="diffrax Dopri8, PID in λ, RecursiveCheckpointAdjoint",
            rtol=TRUTH_RTOL,
            check_rtol=TRUTH_CHECK_RTOL,
            rel_change=change,
        )
        print(
            f"truth: Dopri8 rtol = atol = {TRUTH_RTOL:.0e}; against "
            f"{TRUTH_CHECK_RTOL:.0e} it changes by {change:.1e} (relative) "
            f"[{time.perf_counter() - t_truth:.0f} s]",
            flush=True,
        )
    # Every participant, ours included (`compare` asks `problem.truth`), is scored
    # against this one truth, computed once.
    problem = dataclasses.replace(problem, truth=lambda p, x, c: (None, truth, None))
    rows = []

    def add(engine, method, adjoint, knob, g, t, nfe):
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
                nfe=nfe,
            )
        )
        print(
            f"  {engine:11s} {method:28s} {adjoint:28s} {knob:>10} "
            f"err {rel:9.2e}  {1e3 * t:9.3f} ms  NFE {nfe}",
            flush=True,
        )

    # ours: fixed log-SNR grids (`compare`), each pair over its own N
    for group_steps, group in _pair_groups(pairs, steps):
        recs = compare(
            problem,
            pairs=group,
            steps=group_steps,
            wrt=["xT"],
            repeats=repeats,
            min_time=0.2,
            progress=lambda what: print(f"  adjoint_jax {what} …", flush=True),
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
                    nfe=_our_nfe(r),
                    temp_bytes=r["temp_bytes"],
                )
            )
            print(
                f"  {'adjoint_jax':11s} {r['sampler']:28s} {r['adjoint']:28s} "
                f"{'N=' + str(r['steps']):>10} err {r['rel_error']:9.2e}  "
                f"{1e3 * r['grad_time_s']:9.3f} ms  NFE {_our_nfe(r)}",
                flush=True,
            )
    # ours: error-controlled grids, the grid's cost included
    if our_tols:
        rows += adaptive_points(
            problem, truth, our_tols, repeats, max_steps, adaptive_pairs
        )

    # diffrax: fixed steps on our log-SNR grid, and adaptive. `aj.sample` rewrites
    # the model's convolutions into the layouts XLA:CPU runs fast inside loops
    # (`adjoint_jax._convs`); diffrax runs the model as written unless asked.
    checks["peer_convs"] = peer_convs
    dfx_problem = (
        dataclasses.replace(problem, model=canonical_convs(problem.model))
        if peer_convs == "canonical"
        else problem
    )
    sch = problem.schedule
    args = (problem.x_T,)
    rec, back = diffrax.RecursiveCheckpointAdjoint(), diffrax.BacksolveAdjoint()

    def measure(method, solver, adjoint, knob, **kw):
        f = diffrax_grad(dfx_problem, solver, adjoint, **kw)
        g = f(*args)  # compiles, and is the warm-up run
        t = _median_time(
            lambda: jax.block_until_ready(f(*args)),
            repeats,
            warmup=False,
            max_time=max_time,
        )
        # NFE: one untimed run with the model counted (evaluations, rematerialised
        # ones included, plus VJPs), as for our strategies.
        count = EvalCount()
        counted = dataclasses.replace(problem, model=counting_model(problem.model, count))
        jax.block_until_ready(diffrax_grad(counted, solver, adjoint, **kw)(*args))
        jax.effects_barrier()
        add("diffrax", method, type(adjoint).__name__, knob, g, t, count.forward + count.vjp)

    for n in peer_steps:
        grid = rho_of_t(sch, problem.ts(n))
        for solver in (diffrax.Euler(), diffrax.Heun(), diffrax.Tsit5()):
            measure(f"{type(solver).__name__} (sampler grid, in ρ)", solver, rec, f"N={n}",
                    grid=grid)
        for adj in (rec, back):
            measure("Tsit5 (log-SNR steps, in λ)", diffrax.Tsit5(), adj, f"N={n}",
                    num_steps=n)
    for tol in tols:
        for adj in (rec, back):
            measure("Tsit5 (adaptive, PID, in λ)", diffrax.Tsit5(), adj, f"tol={tol:.0e}",
                    rtol=tol)

    # torchdiffeq
    if not skip_torch:
        import torch

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        checks["torch_threads"] = torch.get_num_threads()
        for n in peer_steps:
            grid = np.asarray(rho_of_t(sch, problem.ts(n)))
            f = torchdiffeq_grad(problem_name, problem, "euler", grid=grid)
            g = f()  # the warm-up run
            add(
                "torchdiffeq",
                "euler (sampler grid, in ρ)",
                "odeint_adjoint",
                f"N={n}",
                g,
                _median_time(f, repeats, warmup=False, max_time=max_time),
                f.nfe,
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
                _median_time(
                    f, min(2, repeats), min_time=0.0, warmup=False, max_time=max_time
                ),
                f.nfe,
            )

    summary = ratios(rows)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "peers.json"), "w") as fh:
        json.dump(
            dict(
                problem=problem_name,
                batch=batch,
                steps=list(steps),
                peer_steps=list(peer_steps),
                tols=list(tols),
                repeats=repeats,
                ours=[
                    f"{s!r} + {a!r}" + ("" if n is None else f" at N = {list(n)}")
                    for s, a, n in map(_entry, pairs)
                ],
                our_tols=list(our_tols),
                max_steps=max_steps,
                adaptive=[f"{s!r} + {a!r}" for s, a in adaptive_pairs],
                adaptive_grid=repr(ADAPTIVE_GRID),
                checks=_clean(checks),
                rows=_clean(rows),
                ratios=_clean(summary),
            ),
            fh,
            indent=1,
        )
    write_markdown(
        rows, summary, os.path.join(out, "peers.md"), problem_name, batch, checks
    )
    plot(rows, os.path.join(out, "peers_pareto.png"), problem_name, batch)
    print(open(os.path.join(out, "peers.md")).read())
    print(f"[run took {time.perf_counter() - t_run:.0f} s]")
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


def _front_time(rows, keep=lambda r: True, above="nan", cost="grad_time_s"):
    """`(our_time, log_errors)`: `our_time(err)` is the time of the Pareto front of our
    points (those `keep` accepts, error ≤ `USEFUL`) at error `err`, interpolated in
    log-log; NaN below the front's best error; above its largest error NaN
    (`above="nan"`) or the time of our cheapest point (`above="cheapest"`).
    `log_errors` are the front's log-errors, increasing. `cost="nfe"`: the same
    with model evaluations + VJPs instead of time."""
    ours = [
        (r[cost], r["rel_error"])
        for r in rows
        if r["engine"] == "adjoint_jax"
        and keep(r)
        and r.get(cost)
        and r["rel_error"]
        and 0 < r["rel_error"] <= USEFUL
    ]
    front = pareto_front(ours)  # time increasing, error decreasing
    le = np.log([e for _, e in front])[::-1]  # error increasing
    lt = np.log([t for t, _ in front])[::-1]

    def our_time(err):
        x = math.log(err)
        if not front or x < le[0]:
            return math.nan
        if x > le[-1]:
            return front[0][0] if above == "cheapest" else math.nan
        return float(np.exp(np.interp(x, le, lt)))

    return our_time, le


def _our_nfe(r):
    """Model evaluations (forward and re-evaluations in the backward pass) plus model
    VJPs of one of our gradients, from `compare`'s counts."""
    return int(r["nfe_forward"] + r["nfe_backward"] + r["vjp_backward"])


def ratios(rows, keep=lambda r: True):
    """For each peer series, (peer time) / (our time at the same error), our time read
    off the Pareto front of all our points (those `keep` accepts), interpolated
    linearly in log-log; only at errors ≤ `USEFUL`. `crossover` is the largest error
    at which the peer is faster than us, or reaches an error we do not reach."""
    our_time, le = _front_time(rows, keep)
    our_nfe, _ = _front_time(rows, keep, cost="nfe")

    summary = []
    for (engine, method, adjoint), rs in _series(rows).items():
        if engine == "adjoint_jax":
            continue
        rr, wins, nr = [], [], []
        for r in rs:
            e = r["rel_error"]
            if e and 0 < e <= USEFUL:
                on = our_nfe(e) if r.get("nfe") else math.nan
                if math.isfinite(on):
                    nr.append(r["nfe"] / on)
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
                nfe_points=len(nr),
                nfe_ratio_median=statistics.median(nr) if nr else math.nan,
                nfe_ratio_min=min(nr, default=math.nan),
                nfe_ratio_max=max(nr, default=math.nan),
            )
        )
    return summary


BAND = (1e-5, 1e-1)  # the error band of the claim


def _peer_name(engine, method, adjoint):
    return f"{engine} `{method}` + `{adjoint}`"


def verdicts(rows, band=BAND, cost="grad_time_s"):
    """Per peer, its points against our Pareto front (all our points with error ≤
    `USEFUL`), in the error band `band`, in time (`cost="grad_time_s"`) or in NFE
    (`cost="nfe"`: model evaluations + VJPs; "time" below then reads NFE). For a peer point of error e in the band our
    time is the front's, interpolated in log-log; if e is above our front's largest
    error, that of our cheapest point (which is more accurate); if e is below our
    best error, our front does not reach it. Peer points more accurate than the band
    are compared with our front at the band's lower end (to reach the band they are a
    point of the peer's front there)."""
    our_time, le = _front_time(rows, above="cheapest", cost=cost)

    out = []
    for (engine, method, adjoint), rs in _series(rows).items():
        if engine == "adjoint_jax":
            continue
        inside, faster, slower, beyond, below, below_lost = 0, 0, [], [], 0, []
        for r in rs:
            e, t = r["rel_error"], r.get(cost)
            if not t or not (e and e > 0 and math.isfinite(e)) or e > band[1]:
                continue
            if e < band[0]:
                below += 1
                ot = our_time(band[0])
                if not (ot <= t):  # NaN: our front does not reach the band's end
                    below_lost.append((e, t / ot))
                continue
            inside += 1
            ot = our_time(e)
            if not math.isfinite(ot):
                beyond.append(e)
            elif ot <= t:
                faster += 1
            else:
                slower.append((e, t / ot))
        out.append(
            dict(
                peer=_peer_name(engine, method, adjoint),
                points=inside,
                ours_faster=faster,
                ours_slower=slower,
                beyond_our_front=beyond,
                below_band=below,
                below_band_lost=below_lost,
                holds=not slower and not beyond and not below_lost,
            )
        )
    best = float(np.exp(le[0])) if len(le) else math.nan  # our front's best error
    return out, best


def _verdict_lines(rows, band=BAND, cost="grad_time_s"):
    table, best = verdicts(rows, band, cost)
    lo, hi = band
    what = "time" if cost == "grad_time_s" else "NFE"
    failing = [v["peer"] for v in table if not v["holds"]]
    compared = [v for v in table if v["points"] or v["below_band"]]
    claim = (
        f"our Pareto front at or below every peer's at every error from {hi:.0e} to "
        f"{lo:.0e}, in {what}"
    )
    if not compared:
        head = f"Claim “{claim}”: no peer has a point in the band on this run."
    elif not failing:
        head = (
            f"Claim “{claim}”: **holds on this run** against all {len(compared)} "
            "peers with points in or below the band."
        )
    else:
        head = (
            f"Claim “{claim}”: **does not hold on this run** against "
            f"{len(failing)} of {len(compared)} peers with points in or below the "
            "band (see the table)."
        )
    reach = (
        f"our front reaches down to {best:.1e}"
        if math.isfinite(best)
        else "we have no point with error ≤ 0.5"
    )
    lines = [
        "",
        f"Verdict in {what} in the error band [{lo:.0e}, {hi:.0e}] ({reach}). For "
        f"each peer point with error in the band: is our {what}-Pareto front's "
        f"{what} at that error (interpolated in log-log; our cheapest point's where "
        f"the peer's error is above our front's largest) at most the peer's? Peer "
        f"points more accurate than {lo:.0e} are compared with our front at "
        f"{lo:.0e}.",
        "",
        head,
        "",
        f"| peer | ours ≤ peer / points in band | ours "
        f"{'slower' if what == 'time' else 'more NFE'} at (error: peer/ours) "
        f"| beyond our front (errors) | points < {lo:.0e}: beating our front at "
        f"{lo:.0e} |",
        "| --- | --- | --- | --- | --- |",
    ]
    fmt_slow = lambda xs: ", ".join(f"{e:.1e}: {q:.2f}×" for e, q in xs) or "–"  # noqa: E731
    for v in table:
        beyond = ", ".join(f"{e:.1e}" for e in v["beyond_our_front"]) or "–"
        if not v["below_band"]:
            below = "–"
        else:
            lost = v["below_band_lost"]
            detail = ", ".join(
                f"{e:.1e}" + (": front does not reach" if not math.isfinite(q) else "")
                for e, q in lost
            )
            below = f"{len(lost)} of {v['below_band']}" + (
                f" ({detail})" if lost else ""
            )
        lines.append(
            f"| {v['peer']} | {v['ours_faster']} / {v['points']} "
            f"| {fmt_slow(v['ours_slower'])} | {beyond} | {below} |"
        )
    return lines


REVERSIBLE = "ReversibleAdjoint()"


def _reversible_lines(rows):
    """Our memory-flat exact points (`ReversibleAdjoint`) against the Pareto front of
    our `DTO()` points (fixed and adaptive grids), at equal error: time and NFE
    ratios, and XLA's temporary memory of the compiled gradient beside DTO's."""
    rev = [r for r in rows if r["engine"] == "adjoint_jax" and r["adjoint"] == REVERSIBLE
           and r["rel_error"] and 0 < r["rel_error"] <= USEFUL]
    if not rev:
        return []
    is_dto = lambda r: r["adjoint"] == "DTO()"  # noqa: E731
    dto_time, _ = _front_time(rows, keep=is_dto)
    dto_nfe, _ = _front_time(rows, keep=is_dto, cost="nfe")
    dto_mem = {(r["method"], r["knob"]): r.get("temp_bytes") for r in rows
               if r["engine"] == "adjoint_jax" and is_dto(r)}
    lines = [
        "",
        "The memory-flat exact strategies (`ReversibleAdjoint`) against the Pareto "
        "front of our `DTO()` points at the same error (time and NFE interpolated in "
        "log-log; – where the error is outside DTO's front), and XLA's temporary "
        "memory of the compiled gradient beside that of DTO through the "
        "non-reversible base on the same grid:",
        "",
        "| method | knob | rel. error | time [ms] | time ÷ DTO's | NFE ÷ DTO's "
        "| temp. memory [MiB] | DTO(base) temp. [MiB] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fmt_q = lambda q: f"{q:.2f}×" if math.isfinite(q) else "–"  # noqa: E731
    fmt_m = lambda b: f"{b / 2**20:.2f}" if b is not None and b >= 0 else "–"  # noqa: E731
    for r in rev:
        e = r["rel_error"]
        base = r["method"].replace("McCallumFoster(base=", "", 1)
        base = base.replace(")", "", 1) if base != r["method"] else base
        lines.append(
            f"| `{r['method']}` | {r['knob']} | {e:.2e} | {1e3 * r['grad_time_s']:.1f} "
            f"| {fmt_q(r['grad_time_s'] / dto_time(e))} "
            f"| {fmt_q(r['nfe'] / dto_nfe(e)) if r.get('nfe') else '–'} "
            f"| {fmt_m(r.get('temp_bytes'))} | {fmt_m(dto_mem.get((base, r['knob'])))} |"
        )
    return lines


def _adaptive_lines(rows):
    """The adaptive grids: per tolerance, the accepted steps, the attempted ones, the
    grid's NFE and time, and what each pair spent on it."""
    ad = [r for r in rows if r.get("grid_steps") is not None]
    if not ad:
        return []
    lines = [
        "",
        f"Our adaptive grids (`aj.adaptive_time_grid` with `{ADAPTIVE_GRID!r}`, "
        "rtol = atol = tol, PID in log-SNR; one grid per batch). The time and NFE of "
        "each adaptive point in the tables above include the grid: its forward solve "
        "with the error estimate (every attempted step, rejected ones included, 7 "
        "evaluations each) plus the gradient through `aj.sample` on the accepted grid "
        "(6 evaluations a step forward, and the adjoint's VJPs and re-evaluations):",
        "",
        "| tol | accepted steps | attempted | grid NFE | grid time [ms] | pair "
        "| rel. error | total NFE | total time [ms] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in ad:
        lines.append(
            f"| {r['knob'].removeprefix('tol=')} | {r['grid_steps']} "
            f"| {r['grid_attempts']:.0f} | {r['grid_nfe']} "
            f"| {1e3 * r['grid_time_s']:.1f} | `{r['method'].removesuffix(' (adaptive grid)')}`"
            f" + `{r['adjoint']}` | {r['rel_error']:.2e} | {r['nfe']} "
            f"| {1e3 * r['grad_time_s']:.1f} |"
        )
    return lines


def _check_lines(checks):
    if not checks:
        return []
    lines = [""]
    par = checks.get("parity")
    if par:
        lines.append(
            "Parity of the PyTorch port with JAX (float64, relative differences; the "
            f"run stops if any exceeds its bound): ε {par['eps']:.1e} (≤ "
            f"{PARITY_EPS:.0e}), loss {par['loss']:.1e}, gradient through `euler` on "
            f"the {par['steps']}-step grid (torchdiffeq `odeint` against diffrax "
            f"`Euler` + `RecursiveCheckpointAdjoint`) {par['euler_grad']:.1e}, "
            "`odeint_adjoint` against `BacksolveAdjoint` (euler, "
            f"{4 * par['steps']} steps in ρ) {par['euler_adjoint']:.1e} (≤ "
            f"{PARITY_GRAD:.0e})."
        )
    tr = checks.get("truth")
    if tr and "rel_change" in tr:
        lines.append(
            f"Truth: {tr['kind']}, rtol = atol = {tr['rtol']:.0e}; against rtol = "
            f"{tr['check_rtol']:.0e} it changes by {tr['rel_change']:.1e} (relative)."
        )
    if "torch_threads" in checks:
        lines.append(f"torch intra-op threads: {checks['torch_threads']}.")
    if checks.get("peer_convs") == "canonical":
        lines.append(
            "diffrax ran the model with its convolutions rewritten to NHWC/HWIO "
            "(`--peer-convs canonical`, what `aj.sample` does on CPU)."
        )
    elif checks.get("peer_convs") == "as-written":
        lines.append(
            "diffrax ran the model as written (`--peer-convs as-written`); on CPU "
            "`aj.sample` rewrites its convolutions to NHWC/HWIO, the layout XLA:CPU "
            "runs fast inside loops, and diffrax does not: `--peer-convs canonical` "
            "gives diffrax the same rewrite."
        )
    return lines


def write_markdown(rows, summary, path, problem_name, batch, checks=None):
    lines = [
        f"Peers on `{problem_name}` (batch {batch}, float64, ∂L/∂x_T; times are "
        "medians of jitted runs, torch eager):",
        "",
        "| engine | method | adjoint | knob | rel. error | time [ms] | NFE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        e = r["rel_error"]
        nfe = r.get("nfe")
        lines.append(
            f"| {r['engine']} | `{r['method']}` | `{r['adjoint']}` | {r['knob']} "
            f"| {e:.2e} | {1e3 * r['grad_time_s']:.3f} | {nfe if nfe else '–'} |"
        )
    lines += [
        "",
        "Time of each peer divided by the time of our best strategy at the same error "
        "(> 1: we are faster; our time interpolated in log-log along the Pareto front "
        f"of all our points), over the peer's points with error ≤ {USEFUL} inside our "
        "error range; and the same for NFE (model evaluations, re-evaluations in the "
        "backward pass included, plus model VJPs; our NFE read off the NFE-Pareto "
        "front of our points):",
        "",
        "| peer | points | median time ratio | range | median NFE ratio | range "
        "| errors compared |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        rng = "–" if not s["points"] else f"{s['ratio_min']:.1f}–{s['ratio_max']:.1f}"
        errs = (
            "none in our range"
            if not s["points"]
            else f"{s['error_range'][0]:.1e}…{s['error_range'][1]:.1e}"
        )
        med = "–" if not s["points"] else f"{s['ratio_median']:.1f}×"
        n = s.get("nfe_points", 0)
        nmed = "–" if not n else f"{s['nfe_ratio_median']:.1f}×"
        nrng = "–" if not n else f"{s['nfe_ratio_min']:.1f}–{s['nfe_ratio_max']:.1f}"
        lines.append(
            f"| {s['engine']} `{s['method']}` + `{s['adjoint']}` | {s['points']} "
            f"| {med} | {rng} | {nmed} | {nrng} | {errs} |"
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
    lines += _verdict_lines(rows)
    lines += _verdict_lines(rows, cost="nfe")
    lines += _reversible_lines(rows)
    lines += _adaptive_lines(rows)
    lines += _check_lines(checks)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def plot(rows, path, problem_name, batch=None):
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
        adaptive = "adaptive" in method
        ax.loglog(
            *zip(*pts),
            marker=("s" if adaptive else "o") if ours else ("+" if adaptive else "x"),
            linestyle=("-" if adjoint != REVERSIBLE else "-.") if ours else "--",
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
    what = problem_name if batch is None else f"{problem_name} (batch {batch})"
    ax.set_title(f"error against time, {what}: adjoint_jax and peers (CPU, float64)")
    ax.grid(True, which="both", alpha=0.3)
    finite = [r["rel_error"] for r in rows if r["rel_error"] and r["rel_error"] > 0]
    ax.set_ylim(bottom=min(finite) / 3, top=min(10.0, 3 * max(finite)))  # blow-ups off
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", default="mixture", choices=list(DEFAULTS),
                   help="the ε-network and data (default: mixture)")
    p.add_argument(
        "--steps", nargs="+", type=int, help="numbers of steps N (default: per problem)"
    )
    p.add_argument(
        "--tols",
        nargs="+",
        type=float,
        help="adaptive tolerances (default: per problem)",
    )
    p.add_argument(
        "--our-tols",
        nargs="+",
        type=float,
        help="tolerances of our adaptive grids (default: per problem; 0: none)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        help="static length of our adaptive grids (default: per problem)",
    )
    p.add_argument("--batch", type=int, help="batch size (default: per problem)")
    p.add_argument(
        "--peer-steps",
        nargs="+",
        type=int,
        help="N of the peers' fixed-step series (default: per problem)",
    )
    p.add_argument("--repeats", type=int, help="timed runs (default: per problem)")
    p.add_argument(
        "--torch-threads",
        type=int,
        help="torch intra-op threads (default: per problem, see DEFAULTS)",
    )
    p.add_argument(
        "--all-pairs",
        action="store_true",
        help="all our strategies (digits runs only the candidates for the front)",
    )
    p.add_argument("--out", default="docs/peers",
                   help="folder for peers.md, peers.json and the figure (default: docs/peers)")
    p.add_argument(
        "--peer-convs",
        choices=["as-written", "canonical"],
        default="as-written",
        help="the model diffrax integrates: as written, or with its convolutions "
        "rewritten to NHWC/HWIO as aj.sample does on CPU (separates the solvers' cost "
        "from XLA:CPU's slow convolution path in loops) (default: as-written)",
    )
    p.add_argument("--no-torch", action="store_true",
                   help="skip torchdiffeq (no torch installed)")
    p.add_argument("--quick", action="store_true", help="a reduced sweep (smoke test)")
    p.add_argument(
        "--check",
        action="store_true",
        help="only the torch/JAX parity check and the truth's convergence check",
    )
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
            data.get("checks"),
        )
        plot(
            rows,
            os.path.join(a.out, "peers_pareto.png"),
            data["problem"],
            data["batch"],
        )
        print(open(os.path.join(a.out, "peers.md")).read())
        return 0
    defaults = dict(DEFAULTS[a.problem], **(QUICK if a.quick else {}))
    own_steps = a.steps is None and not a.quick  # the pairs' own N, where they have one
    for k in ("steps", "peer_steps", "tols", "our_tols", "max_steps", "batch", "repeats"):
        if getattr(a, k) is None:
            setattr(a, k, defaults[k])
    a.our_tols = [t for t in a.our_tols if t > 0]
    pairs = OURS if a.all_pairs else defaults["ours"]
    if not own_steps:
        pairs = [(s, ad) for s, ad, _ in map(_entry, pairs)]
    if a.check:
        problem = build_problem(a.problem, a.batch)
        check_parity(a.problem, problem)
        if problem.truth is None:
            _, change = converged_truth(problem)
            print(
                f"truth: Dopri8 rtol {TRUTH_RTOL:.0e} against {TRUTH_CHECK_RTOL:.0e}: "
                f"relative change {change:.1e}"
            )
        return 0
    run(
        a.problem,
        a.steps,
        a.tols,
        a.batch,
        a.repeats,
        a.out,
        skip_torch=a.no_torch,
        peer_steps=a.peer_steps,
        pairs=pairs,
        max_time=defaults["max_time"],
        torch_threads=a.torch_threads or defaults["torch_threads"],
        peer_convs=a.peer_convs,
        our_tols=a.our_tols,
        max_steps=a.max_steps,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
