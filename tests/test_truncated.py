"""Truncated backpropagation (`aj.Truncated`: DRaFT-K, AlignProp, random truncation),
the surrogate estimators (`aj.draft_lv`, `aj.trajectory_surrogate`), noise
optimisation (∂L/∂noise) and the noise regularisers, each against a direct
computation or a closed form."""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import adjoint_jax as aj
from adjoint_jax.bench import MLPProblem

from .helpers import tree_allclose


PB = MLPProblem.make(jax.random.key(1), dim=3, width=8, cond_dim=2)
SCH = PB.schedule
N = 6
TS = aj.time_grid(SCH, N, t_end=1e-3)
X_T = jax.random.normal(jax.random.key(2), (2, 3))
COND = jnp.array([0.3, -0.5])
NOISE = jax.random.normal(jax.random.key(3), (N, 2, 3))
SDE = aj.DDIM(eta=1.0)


def _loss(x0):
    return jnp.sum(jnp.sin(x0) + 0.3 * x0**2)


def _run(sampler, adjoint, ts=TS, model=PB.model):
    """(p, x_T, cond, noise) -> loss, with the noise only for a stochastic sampler."""

    def f(p, x, c, z):
        return _loss(aj.sample(model, p, x, c, schedule=SCH, ts=ts, sampler=sampler,
                               adjoint=adjoint, noise=z if sampler.is_sde else None))

    return f


def _grads(f, sampler):
    args = (PB.params, X_T, COND, NOISE if sampler.is_sde else None)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3) if sampler.is_sde else (0, 1, 2)))(*args)


SAMPLERS = [aj.DPMSolver2(), SDE, aj.BELM()]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=repr)
def test_truncated_state_is_stop_gradient_then_dto(sampler):
    k = 2

    # By hand: the first N − k steps, a stop_gradient, then DTO over the last k
    # steps continuing the sampler's own state (a multistep or two-step sampler
    # carries more than x, so the hand version runs the steps with `Solve`).
    def hand(p, x, c, z):
        from adjoint_jax._adjoints._base import Solve
        from adjoint_jax._model import split_model

        call, arrays = split_model(PB.model)
        solve = Solve(call, SCH, jnp.asarray(TS), sampler, None, False)
        theta = ((arrays, p))
        zs = (None, None) if z is None else (z[: N - k], z[N - k:])
        state, _ = solve.sub(0, N - k).forward(theta, x, c, zs[0])
        state = jax.lax.stop_gradient(state)
        state, _ = solve.sub(N - k, N).forward(theta, x, c, zs[1], state0=state)
        return _loss(sampler.output(state))

    got = _grads(_run(sampler, aj.Truncated(last=k)), sampler)
    want = _grads(hand, sampler)
    assert tree_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert np.all(np.asarray(got[1]) == 0.0)  # ∂L/∂x_T is exactly zero
    if sampler.is_sde:  # the noises of the detached steps get exactly zero
        assert np.all(np.asarray(got[3][: N - k]) == 0.0)
        assert np.all(np.abs(np.asarray(got[3][N - k:])) > 0)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=repr)
def test_truncated_last_n_is_dto(sampler):
    want = _grads(_run(sampler, aj.DTO()), sampler)
    for detach, inner in (("state", aj.DTO()), ("eps", aj.DTO(checkpoints=2))):
        got = _grads(_run(sampler, aj.Truncated(last=N, detach=detach, inner=inner)), sampler)
        assert tree_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sampler", [aj.DPMSolver2(), SDE], ids=repr)
def test_truncated_eps_is_per_step_stop_gradient_on_eps(sampler):
    k = 2
    t_cut = float(TS[N - k])

    def detached_early(p, x, t, c):
        # Every evaluation of steps 0, ..., N − k − 1 happens at t > t_{N−k}.
        eps = PB.model(p, x, t, c)
        return jnp.where(t > t_cut, jax.lax.stop_gradient(eps), eps)

    got = _grads(_run(sampler, aj.Truncated(last=k, detach="eps")), sampler)
    want = _grads(_run(sampler, aj.DTO(), model=detached_early), sampler)
    assert tree_allclose(got, want, rtol=1e-12, atol=1e-14)
    # The state chain stays differentiable: x_T has a gradient.
    assert np.linalg.norm(np.asarray(got[1])) > 1e-3


def test_random_truncation_distribution_and_one_compile():
    lo, hi = 2, 5
    draws = np.asarray(jax.vmap(
        lambda k: aj.Truncated(last=(lo, hi), key=k).num_differentiated()
    )(jax.random.split(jax.random.key(0), 4000)))
    # Uniform on {lo, ..., hi}: each count within 5 standard deviations of 1000.
    counts = np.bincount(draws, minlength=hi + 1)
    assert counts[:lo].sum() == 0 and counts.sum() == 4000
    assert np.all(np.abs(counts[lo:] - 1000) < 5 * np.sqrt(4000 * 0.25 * 0.75)), counts
    assert int(aj.Truncated(last=(lo, hi), key=jax.random.key(7)).num_differentiated()) == int(
        jax.random.randint(jax.random.key(7), (), lo, hi + 1, dtype=jnp.int32)
    )

    # Each draw's gradient is the fixed truncation's at the drawn k (state and eps,
    # with a checkpointed inner); in a jitted training step taking the key as an
    # argument, new keys compile nothing new.
    for detach, inner in (("state", aj.DTO()), ("eps", aj.DTO(checkpoints="steps"))):
        traces = []

        @jax.jit
        def grad_step(p, x, key):
            traces.append(None)
            adj = aj.Truncated(last=(lo, hi), detach=detach, inner=inner, key=key)
            return jax.grad(_run(aj.DPMSolver2(), adj), argnums=(0, 1))(p, x, COND, None)

        seen = set()
        for seed in (0, 2):  # draws k = 3 and 5
            key = jax.random.key(seed)
            k = int(aj.Truncated(last=(lo, hi), key=key).num_differentiated())
            seen.add(k)
            want = _grads(_run(aj.DPMSolver2(), aj.Truncated(last=k, detach=detach)),
                          aj.DPMSolver2())[:2]
            assert tree_allclose(grad_step(PB.params, X_T, key), want, rtol=1e-12,
                                 atol=1e-14)
        assert seen == {3, 5} and len(traces) == 1


def _temp_bytes(adjoint, n):
    pb = MLPProblem.make(jax.random.key(0), dim=16, width=256, cond_dim=2)
    x_T = jnp.zeros((64, 16))
    ts = aj.time_grid(pb.schedule, n, t_end=1e-3)
    f = jax.jit(jax.grad(lambda p: _loss(aj.sample(
        pb.model, p, x_T, None, schedule=pb.schedule, ts=ts, sampler=aj.DPMSolver2(),
        adjoint=adjoint))))
    return f.lower(pb.params).compile().memory_analysis().temp_size_in_bytes


def test_truncated_memory_is_flat_in_n():
    for detach in ("state", "eps"):
        small = _temp_bytes(aj.Truncated(last=2, detach=detach), 8)
        large = _temp_bytes(aj.Truncated(last=2, detach=detach), 64)
        # "eps" keeps one scalar coefficient per step: a few bytes per step.
        assert large - small <= 0.02 * small, (detach, small, large)
    assert _temp_bytes(aj.DTO(), 64) > 8 * large


def test_noise_gradient_against_finite_differences():
    # Noise optimisation (DNO): x_T and every step noise of DDIM(η = 1), together.
    f = jax.jit(_run(SDE, aj.DTO()))
    g_x, g_z = jax.grad(f, argnums=(1, 3))(PB.params, X_T, COND, NOISE)
    rng = np.random.default_rng(0)
    for _ in range(3):
        dx, dz = rng.standard_normal(X_T.shape), rng.standard_normal(NOISE.shape)
        eps = 1e-6
        fd = (f(PB.params, X_T + eps * dx, COND, NOISE + eps * dz)
              - f(PB.params, X_T - eps * dx, COND, NOISE - eps * dz)) / (2 * eps)
        ad = np.vdot(g_x, dx) + np.vdot(g_z, dz)
        assert abs(fd - ad) <= 1e-7 * abs(ad) + 1e-10, (fd, ad)


def test_draft_lv_against_direct_computation():
    key = jax.random.key(4)
    for sampler in (SDE,):  # (the stochastic last step draws its own noise)
        def f(p, c):
            outs = aj.draft_lv(PB.model, p, X_T, c, schedule=SCH, ts=TS, sampler=sampler,
                               key=key, num=3)
            return jnp.mean(jax.vmap(_loss)(outs))

        def direct(p, c):
            k_sample, k_renoise = jax.random.split(key)
            x0 = aj.sample(PB.model, PB.params, X_T, COND, schedule=SCH, ts=TS,
                           sampler=sampler, key=k_sample if sampler.is_sde else None)
            t = TS[-2]
            total = 0.0
            for j in range(3):
                kj = jax.random.fold_in(k_renoise, j)
                xi = jax.random.normal(jax.random.split(kj, 1)[0], X_T.shape, TS.dtype)
                x1 = SCH.alpha(t) * x0 + SCH.sigma(t) * xi
                total = total + _loss(aj.sample(
                    PB.model, p, x1, c, schedule=SCH, ts=TS[-2:], sampler=sampler,
                    key=jax.random.fold_in(kj, 1) if sampler.is_sde else None))
            return total / 3

        got = jax.value_and_grad(f, argnums=(0, 1))(PB.params, COND)
        want = jax.value_and_grad(direct, argnums=(0, 1))(PB.params, COND)
        assert tree_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_trajectory_surrogate_against_direct_computation():
    steps = (1, -2)
    f = lambda p, c: _loss(aj.trajectory_surrogate(
        PB.model, p, X_T, c, schedule=SCH, ts=TS, sampler=aj.DPMSolver1(), steps=steps))
    value, (g_p, g_c) = jax.value_and_grad(f, argnums=(0, 1))(PB.params, COND)
    x0 = aj.sample(PB.model, PB.params, X_T, COND, schedule=SCH, ts=TS,
                   sampler=aj.DPMSolver1())
    # The sample itself, unchanged: equal to round-off (value_and_grad compiles a
    # different program from aj.sample's, which may round differently).
    assert abs(float(value) - float(_loss(x0))) <= 1e-14 * abs(float(value))

    # Direct: the trajectory step by step, then Σ_i J_θ ε(x_i)ᵀ W_i ∂L/∂x_0 with
    # DPM-Solver-1's weight W_i = (α_N/α_{i+1}) · (−σ_{i+1} (e^{h_i} − 1)).
    xs = [X_T]
    for i in range(N):
        xs.append(aj.sample(PB.model, PB.params, xs[-1], COND, schedule=SCH,
                            ts=TS[i:i + 2], sampler=aj.DPMSolver1()))
    ct = jax.grad(_loss)(xs[-1])
    want = jtu.tree_map(jnp.zeros_like, (PB.params, COND))
    for i in (1, N - 2):
        t, s = TS[i], TS[i + 1]
        w = SCH.alpha(TS[-1]) / SCH.alpha(s) * (-SCH.sigma(s) * jnp.expm1(SCH.lam(s) - SCH.lam(t)))
        _, vjp = jax.vjp(lambda p, c: PB.model(p, xs[i], t, c), PB.params, COND)
        want = jtu.tree_map(jnp.add, want, vjp(w * ct))
    assert tree_allclose((g_p, g_c), want, rtol=1e-10, atol=1e-14)


def test_chi_norm_regulariser_closed_form():
    z = jax.random.normal(jax.random.key(0), (3, 5, 4))
    value, grad = jax.value_and_grad(aj.chi_norm_regulariser)(z, batch_axes=1)
    zz = np.asarray(z).reshape(3, -1)
    d = zz.shape[1]
    norms = np.linalg.norm(zz, axis=1)
    assert np.isclose(value, np.sum(0.5 * norms**2 - (d - 1) * np.log(norms)), rtol=1e-13)
    closed = zz - (d - 1) * zz / norms[:, None] ** 2
    assert np.allclose(np.asarray(grad).reshape(3, -1), closed, rtol=1e-12)
    # A pytree (x_T and the step noises) is one vector per sample.
    tree = {"x": z[:, :2], "noise": z[:, 2:]}
    assert np.isclose(aj.chi_norm_regulariser(tree, batch_axes=1), value, rtol=1e-13)
    # Minimum on the shell ‖z‖ = √(d − 1).
    shell = np.sqrt(d - 1) * zz / norms[:, None]
    assert np.allclose(jax.grad(aj.chi_norm_regulariser)(shell, batch_axes=1), 0, atol=1e-12)


def _dno_closed(v, k):
    """DNO's regulariser term and its gradient, written out in NumPy: with rows b_r,
    mean μ and C = (1/m) Σ b_r b_rᵀ, −log p_μ = m‖μ‖²/(2k) (gradient μ/k per row),
    −log p_C = m δ²/2 with δ = √(1 + ‖C − I‖₂) − 1 − √(k/m) (gradient through the
    top eigenpair (λ, u) of C − I: ∂‖C − I‖₂/∂b_r = sign(λ)(2/m) (u·b_r) u)."""
    m = v.size // k
    b = v[: m * k].reshape(m, k)
    mu = b.mean(0)
    lam, u = np.linalg.eigh(b.T @ b / m - np.eye(k))
    j = np.argmax(np.abs(lam))
    dev = abs(lam[j])
    delta = np.sqrt(1 + dev) - 1 - np.sqrt(k / m)
    log2 = np.log(2)
    mean_term, cov_term = m * mu @ mu / (2 * k), m * delta**2 / 2
    g = np.zeros_like(b)
    if mean_term > log2:
        g += mu / k
    if delta > 0 and cov_term > log2:
        ddelta = 1 / (2 * np.sqrt(1 + dev))
        g += m * delta * ddelta * np.sign(lam[j]) * (2 / m) * np.outer(b @ u[:, j], u[:, j])
    grad = np.zeros_like(v)
    grad[: m * k] = g.ravel()
    return max(mean_term, log2) + max(cov_term, log2), grad


def test_dno_regulariser_closed_form():
    rng = np.random.default_rng(0)
    typical = rng.standard_normal(4096)
    # Typical noise: both bounds capped, value 2 log 2, zero gradient.
    v, g = jax.value_and_grad(aj.dno_regulariser)(jnp.asarray(typical))
    assert np.isclose(v, 2 * np.log(2)) and np.all(np.asarray(g) == 0)
    for bad in (typical + 0.2, 1.5 * typical, typical * np.repeat([1.0, 0.3], 2048)):
        v, g = jax.value_and_grad(aj.dno_regulariser)(jnp.asarray(bad))
        want_v, want_g = _dno_closed(bad, 4)
        assert np.isclose(v, want_v, rtol=1e-12) and v > 2 * np.log(2) + 1
        assert np.allclose(g, want_g, rtol=1e-9, atol=1e-12)
    # With a key: the in-order term plus the mean over the drawn permutations.
    key = jax.random.key(3)
    bad = jnp.asarray(1.5 * typical)
    perms = jax.vmap(lambda kk: jax.random.permutation(kk, 4096))(jax.random.split(key, 8))
    want = _dno_closed(np.asarray(bad), 4)[0] + np.mean(
        [_dno_closed(np.asarray(bad)[np.asarray(p)], 4)[0] for p in perms])
    assert np.isclose(aj.dno_regulariser(bad, key), want, rtol=1e-12)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="last"):
        aj.Truncated(last=0)
    with pytest.raises(ValueError, match="key"):
        aj.Truncated(last=(1, 3))
    with pytest.raises(ValueError, match="lo <= hi"):
        aj.Truncated(last=(3, 1), key=jax.random.key(0))
    with pytest.raises(TypeError, match="tuple"):
        aj.Truncated(last=[1, 3], key=jax.random.key(0))
    with pytest.raises(ValueError, match="detach"):
        aj.Truncated(last=1, detach="x")
    with pytest.raises(TypeError, match="inner"):
        aj.Truncated(last=1, inner=aj.AdjointDEIS())
    with pytest.raises(ValueError, match=r"N = 6"):
        _run(aj.DPMSolver1(), aj.Truncated(last=7))(PB.params, X_T, COND, None)
    with pytest.raises(ValueError, match="steps"):
        aj.trajectory_surrogate(PB.model, PB.params, X_T, COND, schedule=SCH, ts=TS,
                                sampler=aj.DPMSolver1(), steps=(6,))
    with pytest.raises(ValueError, match="block_size"):
        aj.dno_regulariser(jnp.ones(6), block_size=4)
