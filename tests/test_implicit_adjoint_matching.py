"""Implicit Diffusion and Adjoint Matching on a Gaussian base model N(μ, s²) with the
quadratic reward r(x) = −|x − y|²/(2c), whose answers are known in closed form."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adjoint_jax as aj
from adjoint_jax.bench import count_evals


SCH = aj.VPLinear()
MU = jnp.asarray([0.5, -1.0])
S = jnp.asarray([0.7, 1.4])
Y = jnp.asarray([1.5, 0.5])
C = 0.5


def gauss_model(p, x, t, cond):
    """The exact ε of data N(m, v) (per dimension): σ (x − α m)/(α² v + σ²)."""
    del cond
    a, sg = SCH.alpha(t), SCH.sigma(t)
    m, v = (jnp.broadcast_to(p[k], x.shape) for k in ("m", "logv"))
    return sg * (x - a * m) / (a * a * jnp.exp(v) + sg * sg)


BASE = {"m": MU, "logv": jnp.log(S**2)}


def quad_cost(lam):
    """C = −r/λ summed over the batch."""
    return lambda x0: jnp.sum((x0 - jnp.broadcast_to(Y, x0.shape)) ** 2) / (2 * C * lam)


# ---- Adjoint Matching --------------------------------------------------------------


def test_memoryless_diffusion_is_sqrt_beta_for_vp_linear():
    t = jnp.linspace(0.01, 1.0, 7)
    beta = SCH.beta_min + t * (SCH.beta_max - SCH.beta_min)
    np.testing.assert_allclose(aj.memoryless_diffusion(SCH, t), jnp.sqrt(beta), rtol=1e-10)


@pytest.mark.parametrize("t_end", [1e-3, 0.0])
def test_lean_adjoint_equals_dto_adjoint_when_finetuned_is_base(t_end):
    ts = aj.time_grid(SCH, 12, t_end=1e-3)
    if t_end == 0.0:
        ts = np.concatenate([ts[:-1], [0.0]])
    x_T = jax.random.normal(jax.random.key(1), (3, 2))
    noise = jax.random.normal(jax.random.key(2), (12, 3, 2))
    cost = quad_cost(0.7)
    xs, adjs = aj.lean_adjoint(gauss_model, BASE, BASE, x_T, schedule=SCH, ts=ts,
                               terminal_cost=cost, noise=noise)
    run = lambda x, nz: aj.sample(gauss_model, BASE, x, schedule=SCH, ts=ts,
                                  sampler=aj.DDIM(eta=1.0), noise=nz)
    np.testing.assert_allclose(xs[-1], run(x_T, noise), rtol=1e-12, atol=1e-14)
    g_x, g_noise = jax.grad(lambda x, nz: cost(run(x, nz)), argnums=(0, 1))(x_T, noise)
    np.testing.assert_allclose(adjs[0], g_x, rtol=1e-10, atol=1e-14)
    # ∂C/∂ξ_i = (noise scale of step i) · ∂C/∂x_{i+1}: the adjoint at every time.
    scale = jax.vmap(lambda t, s: aj.DDIM(eta=1.0).noise_scale(SCH, t, s))(ts[:-1], ts[1:])
    np.testing.assert_allclose(g_noise, scale[:, None, None] * adjs[1:], rtol=1e-10,
                               atol=1e-14)
    # With the key instead of explicit noise: the same noise `aj.sample` draws.
    key = jax.random.key(5)
    xs_k, _ = aj.lean_adjoint(gauss_model, BASE, BASE, x_T, schedule=SCH, ts=ts,
                              terminal_cost=cost, key=key)
    ref = aj.sample(gauss_model, BASE, x_T, schedule=SCH, ts=ts, sampler=aj.DDIM(eta=1.0),
                    key=key)
    np.testing.assert_allclose(xs_k[-1], ref, rtol=1e-12, atol=1e-14)


def test_lean_adjoint_drops_the_finetuned_jacobian():
    # Fine-tuned ≠ base: the trajectory is the fine-tuned model's, the adjoint uses
    # the base model's Jacobian (by hand: a backward loop of base-model step VJPs).
    ts = aj.time_grid(SCH, 6, t_end=1e-3)
    fine = {"m": MU + 0.3, "logv": BASE["logv"] - 0.2}
    x_T = jax.random.normal(jax.random.key(3), (2, 2))
    noise = jax.random.normal(jax.random.key(4), (6, 2, 2))
    cost = quad_cost(1.0)
    xs, adjs = aj.lean_adjoint(gauss_model, fine, BASE, x_T, schedule=SCH, ts=ts,
                               terminal_cost=cost, noise=noise)
    ddim = aj.DDIM(eta=1.0)
    x, states = x_T, [x_T]
    for i in range(6):
        x = ddim.step(lambda xx, t: gauss_model(fine, xx, t, None), SCH, x, ts[i],
                      ts[i + 1], i, noise[i])
        states.append(x)
    a = jax.grad(cost)(states[-1])
    np.testing.assert_allclose(adjs[-1], a, rtol=1e-12)
    for i in reversed(range(6)):
        step = lambda xx: ddim.step(lambda y, t: gauss_model(BASE, y, t, None), SCH, xx,
                                    ts[i], ts[i + 1], i, noise[i])
        a = jax.vjp(step, states[i])[1](a)[0]
        np.testing.assert_allclose(adjs[i], a, rtol=1e-10)
    np.testing.assert_allclose(xs, jnp.stack(states), rtol=1e-12)


def test_adjoint_matching_loss_value_and_gradient_by_hand():
    ts = aj.time_grid(SCH, 5, t_end=1e-3)
    fine = {"m": MU + 0.3, "logv": BASE["logv"] - 0.2}
    x_T = jax.random.normal(jax.random.key(3), (2, 2))
    key = jax.random.key(9)
    cost = quad_cost(1.0)
    loss = lambda p: aj.adjoint_matching_loss(gauss_model, p, BASE, x_T, schedule=SCH,
                                              ts=ts, terminal_cost=cost, key=key)
    k_noise, _ = jax.random.split(key)
    xs, adjs = aj.lean_adjoint(gauss_model, fine, BASE, x_T, schedule=SCH, ts=ts,
                               terminal_cost=cost, key=k_noise)

    def by_hand(p):
        tot = 0.0
        for i in range(5):
            d = (gauss_model(p, xs[i], ts[i], None) - gauss_model(BASE, xs[i], ts[i], None)
                 - SCH.sigma(ts[i]) * adjs[i])
            tot = tot + jnp.sum(d**2)
        return tot / 5

    np.testing.assert_allclose(loss(fine), by_hand(fine), rtol=1e-12)
    g, g_ref = jax.grad(loss)(fine), jax.grad(by_hand)(fine)
    for k in g:
        np.testing.assert_allclose(g[k], g_ref[k], rtol=1e-10)
    # At the base model with zero reward gradient the loss (and its gradient) is 0.
    zero = aj.adjoint_matching_loss(gauss_model, BASE, BASE, x_T, schedule=SCH, ts=ts,
                                    terminal_cost=lambda x: 0.0 * jnp.sum(x), key=key)
    assert float(zero) == 0.0


def test_adjoint_matching_recovers_the_tilted_gaussian():
    # p* ∝ N(μ, s²) exp(r/λ) is N(m*, v*) with 1/v* = 1/s² + 1/(cλ) and
    # m* = v* (μ/s² + y/(cλ)); the model family (exact ε of N(m, v)) contains it.
    lam = 1.0
    prec = 1 / S**2 + 1 / (C * lam)
    m_star, v_star = (MU / S**2 + Y / (C * lam)) / prec, 1 / prec
    ts = aj.time_grid(SCH, 50, t_end=1e-3, spacing="time")
    opt = optax.adam(0.02)
    cost = quad_cost(lam)

    @jax.jit
    def train(p):
        def body(carry, k):
            p, o = carry
            k1, k2 = jax.random.split(k)
            x_T = jax.random.normal(k1, (256, 2))
            g = jax.grad(lambda p: aj.adjoint_matching_loss(
                gauss_model, p, BASE, x_T, schedule=SCH, ts=ts, terminal_cost=cost,
                key=k2, num_times=10))(p)
            u, o = opt.update(g, o)
            p = optax.apply_updates(p, u)
            return (p, o), p

        _, ps = jax.lax.scan(body, (p, opt.init(p)), jax.random.split(jax.random.key(0), 600))
        return ps

    with jax.numpy_dtype_promotion("standard"):  # optax is not written for strict
        ps = train(BASE)
    late = jax.tree.map(lambda v: v[400:], ps)
    m, v = jnp.mean(late["m"], 0), jnp.exp(jnp.mean(late["logv"], 0))
    # Monte-Carlo error: the iterates fluctuate with std ≈ 0.005 (m) and ≈ 0.01
    # (log v) (measured); the average of the last 200 is within 0.002 / 1% of the
    # closed form (discretisation at N = 50 included). Bounds: 0.02 and 4%.
    np.testing.assert_allclose(m, m_star, atol=0.02)
    np.testing.assert_allclose(v, v_star, rtol=0.04)
    assert float(jnp.max(jnp.std(late["m"], 0))) < 0.02
    # And the fine-tuned model's distribution: mean and variance of 20 000 samples by
    # its probability-flow ODE (DPM-Solver++(2M) at N = 50, accurate to ~1e-4 here;
    # DDPM sampling itself at N = 50 underestimates the variance by ~18%, a property of
    # that sampler, not of the fine-tuning). Sampling error ≈ 0.005 in the mean, ≈ 1%
    # in the variance.
    x = aj.sample(gauss_model, {"m": m, "logv": jnp.log(v)},
                  jax.random.normal(jax.random.key(7), (20000, 2)), schedule=SCH,
                  ts=aj.time_grid(SCH, 50, t_end=1e-4), sampler=aj.DPMSolverPP())
    np.testing.assert_allclose(jnp.mean(x, 0), m_star, atol=0.03)
    np.testing.assert_allclose(jnp.var(x, 0), v_star, rtol=0.06)


def test_adjoint_matching_errors():
    ts = aj.time_grid(SCH, 4, t_end=1e-3)
    x_T = jnp.zeros((2, 2))
    kw = dict(schedule=SCH, ts=ts, terminal_cost=quad_cost(1.0))
    with pytest.raises(ValueError, match="weighting"):
        aj.adjoint_matching_loss(gauss_model, BASE, BASE, x_T, key=jax.random.key(0),
                                 weighting="snr", **kw)
    with pytest.raises(ValueError, match="num_times"):
        aj.adjoint_matching_loss(gauss_model, BASE, BASE, x_T, key=jax.random.key(0),
                                 num_times=5, **kw)
    with pytest.raises(ValueError, match="key=jax.random.key"):
        aj.lean_adjoint(gauss_model, BASE, BASE, x_T, **kw)
    with pytest.raises(ValueError, match=r"noise. leaves must have shape"):
        aj.lean_adjoint(gauss_model, BASE, BASE, x_T, noise=jnp.zeros((3, 2, 2)), **kw)


def test_adjoint_matching_control_weighting_and_time_subset():
    ts = aj.time_grid(SCH, 8, t_end=1e-3)
    x_T = jax.random.normal(jax.random.key(3), (2, 2))
    fine = {"m": MU + 0.3, "logv": BASE["logv"]}
    kw = dict(schedule=SCH, ts=ts, terminal_cost=quad_cost(1.0), key=jax.random.key(4))
    full = aj.adjoint_matching_loss(gauss_model, fine, BASE, x_T, weighting="control", **kw)
    k_noise, _ = jax.random.split(kw["key"])
    xs, adjs = aj.lean_adjoint(gauss_model, fine, BASE, x_T, schedule=SCH, ts=ts,
                               terminal_cost=quad_cost(1.0), key=k_noise)
    tot = 0.0
    for i in range(8):
        g2 = aj.memoryless_diffusion(SCH, ts[i]) ** 2
        w = 8 * g2 * (ts[i] - ts[i + 1]) / SCH.sigma(ts[i]) ** 2
        d = (gauss_model(fine, xs[i], ts[i], None) - gauss_model(BASE, xs[i], ts[i], None)
             - SCH.sigma(ts[i]) * adjs[i])
        tot = tot + w * jnp.sum(d**2)
    np.testing.assert_allclose(full, tot / 8, rtol=1e-10)
    # A subset of K times: the mean over K distinct indices of the same terms.
    sub = aj.adjoint_matching_loss(gauss_model, fine, BASE, x_T, num_times=3, **kw)
    terms = [
        jnp.sum((gauss_model(fine, xs[i], ts[i], None) - gauss_model(BASE, xs[i], ts[i], None)
                 - SCH.sigma(ts[i]) * adjs[i]) ** 2)
        for i in range(8)
    ]
    sums = {float(sum(terms[j] for j in c)) / 3 for c in _combinations(8, 3)}
    assert any(abs(float(sub) - v) < 1e-10 * max(1.0, abs(v)) for v in sums)


def _combinations(n, k):
    import itertools

    return itertools.combinations(range(n), k)


# ---- Implicit Diffusion ------------------------------------------------------------


def mean_model(theta, x, t, cond):
    """The exact ε of data N(θ, s²): θ is the optimised mean."""
    return gauss_model({"m": theta, "logv": jnp.log(S**2)}, x, t, cond)


def id_loss(x0):
    return jnp.mean(jnp.sum((x0 - jnp.broadcast_to(Y, x0.shape)) ** 2, -1)) / (2 * C)


@pytest.mark.parametrize(
    # Multistep (a carried ε), stochastic (recorded noise), and a start-up evaluation.
    "sampler", [aj.DPMSolver2(), aj.DDIM(eta=1.0), aj.ReversibleHeun()],
    ids=lambda s: type(s).__name__,
)
def test_implicit_diffusion_gradient_is_dto_when_theta_is_fixed(sampler):
    # θ held fixed and the same x_T and noises in every trajectory: once the
    # register has cycled (2N iterations), every iteration's gradient is exactly
    # the DTO gradient of that one sample.
    n = 6
    ts = aj.time_grid(SCH, n, t_end=1e-3)
    opt = aj.ImplicitDiffusion(mean_model, schedule=SCH, ts=ts, sampler=sampler, loss=id_loss)
    x_like = jnp.zeros((3, 2))
    # Through Equinox's filter_jit too: the module (grid included) is a valid pytree.
    state = eqx.filter_jit(opt.init)(MU, x_like, jax.random.key(0))
    step = eqx.filter_jit(opt.step)
    key = jax.random.key(5)
    for it in range(2 * n + 1):
        g, state, (value, x0) = step(MU, state, key)
        if it == 2 * n - 2:  # one trajectory of the warm-up still in the register
            g_early = g
    k_x, k_n = jax.random.split(key)
    # Drawn as `aj.ImplicitDiffusion` documents: x_T from the key's first half,
    # step j's noise from fold_in(second half, j) (one split per leaf of x).
    x_T = jax.random.normal(jax.random.split(k_x, 1)[0], (3, 2))
    kw = {}
    if sampler.is_sde:
        kw["noise"] = jax.vmap(lambda j: jax.random.normal(
            jax.random.split(jax.random.fold_in(k_n, j), 1)[0], (3, 2)))(jnp.arange(n))
    run = lambda th: aj.sample(mean_model, th, x_T, schedule=SCH, ts=ts, sampler=sampler, **kw)
    np.testing.assert_allclose(x0, run(MU), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(value, id_loss(run(MU)), rtol=1e-12)
    g_dto = jax.grad(lambda th: id_loss(run(th)))(MU)
    np.testing.assert_allclose(g, g_dto, rtol=1e-9, atol=1e-13)
    assert float(jnp.max(jnp.abs(g_early - g_dto))) > 1e-6
    assert int(state.iteration) == 2 * n + 1


def test_implicit_diffusion_costs_one_batched_eval_and_one_batched_vjp():
    ts = aj.time_grid(SCH, 8, t_end=1e-3)
    make = lambda m: aj.ImplicitDiffusion(m, schedule=SCH, ts=ts, sampler=aj.DPMSolver2(),
                                          loss=id_loss)
    state = make(mean_model).init(MU, jnp.zeros((4, 2)), jax.random.key(0))
    c = count_evals(lambda m, th, s: make(m).step(th, s, jax.random.key(1)), mean_model,
                    MU, state)
    # One batched sampling evaluation, one batched VJP (whose own forward pass, at
    # the replayed states, is the second forward evaluation).
    assert (c.forward, c.vjp) == (2, 1)
    # The same batch through sequential DTO: N evaluations and N VJPs.
    d = count_evals(lambda m, th: jax.grad(lambda th: id_loss(aj.sample(
        m, th, jnp.ones((4, 2)), schedule=SCH, ts=ts, sampler=aj.DPMSolver2())))(th),
        mean_model, MU)
    assert (d.forward, d.vjp) == (8, 8)


@pytest.mark.parametrize("sampler", [aj.DPMSolver2(), aj.DDIM(eta=1.0)],
                         ids=lambda s: type(s).__name__)
def test_implicit_diffusion_converges_to_the_closed_form_optimum(sampler):
    # The sample is affine in (x_T, noise, θ): x_0 = M x_T + Σ N_i ξ_i + K θ with
    # K = ∂x_0/∂θ (diagonal; computed exactly by linearity), so
    # E L(θ) = E|x_0 − y|²/(2c) is minimal at θ* = y / K (the discrete sampler's own
    # optimum; K → 1 as N grows, θ* → y).
    n = 8
    ts = aj.time_grid(SCH, n, t_end=1e-3)
    kw = {"noise": jnp.zeros((n, 1, 2))} if sampler.is_sde else {}
    K = aj.sample(mean_model, jnp.ones(2), jnp.zeros((1, 2)), schedule=SCH, ts=ts,
                  sampler=sampler, **kw)[0]
    theta_star = Y / K
    opt = aj.ImplicitDiffusion(mean_model, schedule=SCH, ts=ts, sampler=sampler, loss=id_loss)
    sgd = optax.sgd(0.05)

    @jax.jit
    def run(theta):
        state = opt.init(theta, jnp.zeros((256, 2)), jax.random.key(0))

        def body(carry, k):
            theta, state, o = carry
            g, state, _ = opt.step(theta, state, k)
            u, o = sgd.update(g, o)
            theta = optax.apply_updates(theta, u)
            return (theta, state, o), theta

        _, thetas = jax.lax.scan(body, (theta, state, sgd.init(theta)),
                                 jax.random.split(jax.random.key(1), 400))
        return thetas

    with jax.numpy_dtype_promotion("standard"):  # optax is not written for strict
        thetas = run(MU)
    late = thetas[300:]
    # Per-iteration gradient noise (batch 256) makes the iterates fluctuate (measured
    # std 0.008–0.025 per coordinate); their mean over the last 100 iterations is
    # within 0.01 of θ* (measured 0.002–0.0096). Bound: 0.03.
    np.testing.assert_allclose(jnp.mean(late, 0), theta_star, atol=0.03)
    assert float(jnp.max(jnp.abs(thetas[0] - theta_star))) > 0.5  # it had to move


def test_implicit_diffusion_errors():
    ts = aj.time_grid(SCH, 4, t_end=1e-3)
    with pytest.raises(TypeError, match="loss"):
        aj.ImplicitDiffusion(mean_model, schedule=SCH, ts=ts, sampler=aj.DPMSolver2(),
                             loss=None)
    with pytest.raises(TypeError, match="aj.DPMSolver2()"):
        aj.ImplicitDiffusion(mean_model, schedule=SCH, ts=ts, sampler=aj.DPMSolver2,
                             loss=id_loss)
    opt = aj.ImplicitDiffusion(mean_model, schedule=SCH, ts=ts, sampler=aj.DPMSolver2(),
                               loss=id_loss)
    with pytest.raises(TypeError, match="x_like"):
        opt.init(MU, jnp.zeros((3, 2), jnp.int32), jax.random.key(0))
    with pytest.raises(ValueError, match="decreasing"):
        aj.ImplicitDiffusion(mean_model, schedule=SCH, ts=ts[::-1],
                             sampler=aj.DPMSolver2(), loss=id_loss).init(
            MU, jnp.zeros((3, 2)), jax.random.key(0))
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda t: aj.ImplicitDiffusion(mean_model, schedule=SCH, ts=t,
                                               sampler=aj.DPMSolver2(), loss=id_loss))(ts)
