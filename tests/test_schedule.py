import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adjoint_jax as aj

from .helpers import all_eqns


VP = [aj.VPLinear(), aj.VPLinear(beta_min=0.5, beta_max=5.0), aj.VPCosine()]
ALL = VP + [
    aj.VPDiscrete(np.linspace(1e-4, 0.02, 1000)),
    aj.FlowMatching(),
]


def _grid(sch, n=2001):
    return jnp.linspace(sch.t_min, sch.t_max, n)


@pytest.mark.parametrize("sch", VP, ids=repr)
def test_vp_preserves_variance(sch):
    t = _grid(sch)
    np.testing.assert_allclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, 1.0, rtol=1e-12)


@pytest.mark.parametrize("sch", ALL, ids=lambda s: type(s).__name__)
def test_t_of_lam_inverts_lam(sch):
    t = _grid(sch)
    np.testing.assert_allclose(sch.t_of_lam(sch.lam(t)), t, rtol=1e-9, atol=1e-12)
    # λ strictly decreasing in t.
    assert jnp.all(jnp.diff(sch.lam(t)) < 0)


@pytest.mark.parametrize("sch", ALL, ids=lambda s: type(s).__name__)
def test_jit_and_vmap_safe(sch):
    t = _grid(sch, 7)
    np.testing.assert_allclose(jax.jit(lambda u: sch.lam(u))(t), sch.lam(t), rtol=1e-12)
    np.testing.assert_allclose(
        jax.jit(lambda sc, u: sc.t_of_lam(u))(sch, sch.lam(t)), t, rtol=1e-9
    )
    np.testing.assert_allclose(jax.vmap(sch.sigma)(t), sch.sigma(t), rtol=1e-12)


def test_lam_accurate_near_zero():
    sch = aj.VPLinear()
    t = 1e-7
    # σ² = 1 − α² = 1 − exp(−β_min t − ½ Δβ t²) ≈ β_min t: relative precision must
    # survive the cancellation in 1 − α².
    np.testing.assert_allclose(sch.sigma(t) ** 2, 0.1 * t, rtol=1e-5)
    np.testing.assert_allclose(
        sch.sigma(jnp.float32(t)) ** 2, 0.1 * t, rtol=1e-4
    )


def test_vpdiscrete_matches_ddpm_alphas_cumprod():
    betas = np.linspace(1e-4, 0.02, 1000)
    sch = aj.VPDiscrete(betas)
    alphas_cumprod = np.cumprod(1.0 - betas)
    n = np.arange(1000)
    t = (n + 1) / 1000
    np.testing.assert_allclose(sch.alpha(t) ** 2, alphas_cumprod, rtol=1e-12)
    np.testing.assert_allclose(sch.sigma(t) ** 2, 1 - alphas_cumprod, rtol=1e-10)
    assert sch.t_min == 1e-3 and sch.t_max == 1.0


@pytest.mark.parametrize(
    "config, expected",
    [
        (
            {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
             "beta_schedule": "linear"},
            np.linspace(1e-4, 0.02, 1000),
        ),
        (
            {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear"},
            np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2,
        ),
        ({"trained_betas": [0.1, 0.2, 0.3]}, np.array([0.1, 0.2, 0.3])),
    ],
)
def test_from_diffusers_config(config, expected):
    sch = aj.diffusers_schedule(config)
    np.testing.assert_allclose(
        sch.log_alphas, 0.5 * np.cumsum(np.log1p(-expected.astype(np.float64))),
        rtol=1e-12,
    )


def test_from_diffusers_config_cosine():
    sch = aj.diffusers_schedule(
        {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
    )
    # ᾱ_n follows the cosine law cos²(((n+1)/N + s)/(1 + s) π/2)/cos²(s/(1+s) π/2)
    # wherever the 0.999 cap is inactive.
    n = np.arange(900)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    expected = f((n + 1) / 1000) / f(0.0)
    np.testing.assert_allclose(np.exp(2 * sch.log_alphas[:900]), expected, rtol=1e-5)


def test_bad_schedules():
    with pytest.raises(ValueError, match="beta_min"):
        aj.VPLinear(beta_min=-1.0)
    with pytest.raises(ValueError, match="beta_schedule"):
        aj.diffusers_schedule({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="betas"):
        aj.VPDiscrete([0.1])
    with pytest.raises(ValueError, match="t_max"):
        aj.VPCosine(t_max=1.0)


def test_flow_matching():
    sch = aj.FlowMatching()
    t = jnp.linspace(0.1, 0.9, 5)
    np.testing.assert_allclose(sch.alpha(t), 1 - t, rtol=1e-14)
    np.testing.assert_allclose(sch.sigma(t), t, rtol=1e-14)


@pytest.mark.parametrize("spacing", ["logsnr", "time", "quadratic"])
@pytest.mark.parametrize("sch", ALL, ids=lambda s: type(s).__name__)
def test_time_grid(sch, spacing):
    t_end = max(sch.t_min, 1e-3)
    ts = aj.time_grid(sch, 20, t_end=t_end, spacing=spacing)
    assert ts.shape == (21,)
    assert jnp.all(jnp.diff(ts) < 0)
    assert ts[0] == sch.t_max and ts[-1] == t_end
    if spacing == "logsnr":
        np.testing.assert_allclose(jnp.diff(sch.lam(ts)), jnp.diff(sch.lam(ts))[0],
                                   rtol=1e-8)
    elif spacing == "quadratic":
        np.testing.assert_allclose(jnp.diff(jnp.sqrt(ts)), jnp.diff(jnp.sqrt(ts))[0],
                                   rtol=1e-8)


def test_time_grid_errors():
    sch = aj.VPLinear()
    with pytest.raises(ValueError, match="num_steps"):
        aj.time_grid(sch, 0, t_end=1e-3)
    with pytest.raises(ValueError, match="spacing"):
        aj.time_grid(sch, 10, t_end=1e-3, spacing="cubic")
    with pytest.raises(ValueError, match="t_end"):
        aj.time_grid(sch, 10, t_end=2.0)


def test_time_grid_inside_jit_is_a_constant():
    # Built inside a jitted loss, the grid is computed at once (equal to the eager
    # one), so `aj.sample` checks it while tracing and the program holds no runtime
    # check (a host callback, which JAX's persistent compilation cache refuses);
    # a grid passed in as a traced argument keeps its runtime checks.
    sch = aj.VPLinear()
    pb_model = lambda p, x, t, c: p * x * t  # noqa: E731
    seen = []

    def loss(p, ts=None):
        if ts is None:
            ts = aj.time_grid(sch, 4, t_end=1e-3)
            seen.append(ts)
        return jnp.sum(aj.sample(pb_model, p, jnp.ones(3), None, schedule=sch, ts=ts,
                                 sampler=aj.DPMSolver2()))

    def has_callback(jaxpr):
        return any("callback" in eqn.primitive.name for eqn in all_eqns(jaxpr))

    inside = jax.make_jaxpr(jax.grad(loss))(0.5)
    assert not isinstance(seen[0], jax.core.Tracer)
    np.testing.assert_array_equal(seen[0], aj.time_grid(sch, 4, t_end=1e-3))
    assert not has_callback(inside.jaxpr)
    passed = jax.make_jaxpr(jax.grad(loss))(0.5, aj.time_grid(sch, 4, t_end=1e-3))
    assert has_callback(passed.jaxpr)
    # A schedule whose parameters are traced gives a traced, differentiable grid.
    d = jax.grad(lambda b: jnp.sum(aj.time_grid(aj.VPLinear(beta_max=b), 4,
                                                t_end=1e-3)))(20.0)
    assert np.isfinite(d) and d != 0


class _ListSchedule(aj.AbstractSchedule):
    """A user's schedule with an unhashable field (a list of betas, static to JAX):
    VPLinear's formulas."""

    betas: list
    t_min: float = 1e-5
    t_max: float = 1.0
    alpha_zero_time: None = None

    def log_alpha(self, t):
        b0, b1 = self.betas
        return -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0

    def log_sigma(self, t):
        return 0.5 * jnp.log(-jnp.expm1(2.0 * self.log_alpha(t)))

    def t_of_lam(self, lam):
        return aj.VPLinear(beta_min=self.betas[0], beta_max=self.betas[1]).t_of_lam(lam)


def test_user_schedule_with_unhashable_field_samples_like_the_builtin():
    # The samplers' step coefficients are traced once per hashable schedule (a
    # staged call); a schedule that cannot be hashed is computed inline, with the
    # same result.
    ref = aj.VPLinear(beta_min=0.5, beta_max=5.0)
    mine = _ListSchedule([0.5, 5.0])
    with pytest.raises(TypeError):
        hash(mine)
    model = lambda p, x, t, c: p * x * t
    x_T = jnp.array([0.3, -1.2])
    ts = aj.time_grid(ref, 6, t_end=1e-3)
    kw = dict(ts=ts, sampler=aj.DPMSolver2(), adjoint=aj.DTO())
    out = jax.value_and_grad(lambda p, s: jnp.sum(aj.sample(model, p, x_T, None,
                                                           schedule=s, **kw)))
    (v_mine, g_mine), (v_ref, g_ref) = out(0.7, mine), out(0.7, ref)
    np.testing.assert_allclose(v_mine, v_ref, rtol=1e-14)
    np.testing.assert_allclose(g_mine, g_ref, rtol=1e-14)
