"""The samplers behind `DPMSolverMultistepScheduler`'s options (`aj.SDEDPMSolverPP`,
`aj.DPMSolver`, `aj.DPMSolverPP(thresholding=...)`): their DTO gradients against
central finite differences of diffusers itself (torch, float64, same noises), their
orders on the closed-form Gaussian, and networks computing in bfloat16 on every new
grid (Karras, lu, exponential, beta, flow, EDM): finite, close to float64, and called
with diffusers' timesteps (no collisions)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adjoint_jax as aj
from adjoint_jax.bench import GaussianProblem

from .diffusers64 import DPM64, run_vp
from .diffusers64_dpm import EDMDPM64
from .helpers import slope
from .test_diffusers_dpm import NOISE, SD, X_T, Net, config_of, torch_net
from .test_diffusers_edm import EDMNet


pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning",
    "ignore::FutureWarning",
)

MU = 0.7


# ---- DTO gradients against diffusers' own finite differences ----------------------
GRAD_CASES = {
    "SDEDPMSolverPP(order=3), Karras": (
        SD | dict(algorithm_type="sde-dpmsolver++", solver_order=3,
                  use_karras_sigmas=True),
        aj.SDEDPMSolverPP(order=3)),
    "DPMSolver(sde=True, heun)": (
        SD | dict(algorithm_type="sde-dpmsolver", solver_type="heun",
                  final_sigmas_type="sigma_min"),
        aj.DPMSolver(solver_type="heun", sde=True)),
    "DPMSolver(order=3)": (
        SD | dict(algorithm_type="dpmsolver", solver_order=3,
                  final_sigmas_type="sigma_min"),
        aj.DPMSolver(order=3)),
    "DPMSolverPP(thresholding=(0.9, 1.5))": (
        SD | dict(thresholding=True, dynamic_thresholding_ratio=0.9,
                  sample_max_value=1.5),
        aj.DPMSolverPP(thresholding=(0.9, 1.5))),
}


def _loss(x, lib):
    return float((lib.sin(x) + 0.3 * x**2).sum()) if lib is torch else jnp.sum(
        jnp.sin(x) + 0.3 * x**2)


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_dto_gradient_matches_diffusers_finite_differences(case):
    """dL/dμ (μ the data mean the network is built on) through `aj.sample` with
    `aj.DTO()`, against (L(μ + δ) − L(μ − δ))/2δ of diffusers' own loop."""
    kw, expected = GRAD_CASES[case]
    n, delta = 10, 1e-5
    noise = NOISE if kw.get("algorithm_type", "").startswith("sde") else None

    def diffusers_loss(mu):
        sched = DPM64(**kw)
        sched.set_timesteps(n)
        out = run_vp(sched, torch_net(sched, "epsilon", False, mu), X_T, noise=noise)
        return _loss(torch.as_tensor(out), torch)

    fd = (diffusers_loss(MU + delta) - diffusers_loss(MU - delta)) / (2 * delta)
    sched = DPM64(**kw)
    setup = aj.from_diffusers(config_of(sched), n, model=Net(
        jnp.asarray(sched.alphas_cumprod.numpy()), "epsilon", False))
    assert setup.sampler == expected
    steps = len(setup.ts) - 1

    def loss(mu):
        out = aj.sample(setup.model, mu, jnp.asarray(X_T), schedule=setup.schedule,
                        ts=setup.ts, sampler=setup.sampler, adjoint=aj.DTO(),
                        noise=None if noise is None else jnp.asarray(noise[:steps]))
        return _loss(out, jnp)

    value, grad = jax.value_and_grad(loss)(jnp.asarray(MU))
    assert abs(float(value) - diffusers_loss(MU)) < 1e-10
    assert abs(float(grad) - fd) < 1e-6 * max(1.0, abs(fd)), (float(grad), fd)


# ---- orders on the closed-form Gaussian ---------------------------------------------
PB = GaussianProblem.make(4)
T0, T_END = PB.schedule.t_max, 1e-3


def _strong_error(sampler, n):
    ts = aj.time_grid(PB.schedule, n, t_end=T_END)
    x_T = jnp.array([0.3, -1.2, 2.0, 0.7])
    out = aj.sample(PB.model, PB.params, x_T, schedule=PB.schedule, ts=ts,
                    sampler=sampler)
    return float(jnp.max(jnp.abs(out - PB.flow_map(PB.params, x_T, None, T0, T_END))))


def _weak_error(sampler, n):
    """The sampler is affine in (x_T, ξ) on Gaussian data: its output's mean is the
    run from the mean x_T with ξ = 0 (exact for these samplers), and its variance
    (∂out/∂x_T)² v_T + Σ_i (∂out/∂ξ_i)² (elementwise). The error is that variance's
    distance to the data marginal's v_end = α² s² + σ² (a weak error)."""
    sch = PB.schedule
    ts = aj.time_grid(sch, n, t_end=T_END)
    v = lambda t: sch.alpha(t) ** 2 * PB.s**2 + sch.sigma(t) ** 2

    def out(x_T, noise):
        return jnp.sum(aj.sample(PB.model, PB.params, x_T, schedule=sch, ts=ts,
                                 sampler=sampler, noise=noise))

    mean_T = sch.alpha(T0) * PB.mu
    g_x, g_n = jax.grad(out, argnums=(0, 1))(mean_T, jnp.zeros((n, 4)))
    var = g_x**2 * v(T0) + jnp.sum(g_n**2, axis=0)
    return float(jnp.max(jnp.abs(var - v(T_END))))


@pytest.mark.parametrize(
    "sampler,order,ns,error",
    [
        (aj.DPMSolver(), 2, [20, 40, 80], _strong_error),
        # Order 3 as diffusers writes it is second order (D₂ half its Taylor value).
        (aj.DPMSolver(order=3), 2, [20, 40, 80], _strong_error),
        (aj.DPMSolver(sde=True), 2, [20, 40, 80], _weak_error),
        (aj.SDEDPMSolverPP(order=1), 1, [40, 80, 160], _weak_error),
        (aj.SDEDPMSolverPP(), 2, [20, 40, 80], _weak_error),
        # diffusers' third-order D₂ coefficient leaves a local O(h²) term: first order.
        (aj.SDEDPMSolverPP(order=3), 1, [80, 160, 320], _weak_error),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) and not isinstance(v, aj.AbstractSampler) else repr(v),
)
def test_order_on_gaussian(sampler, order, ns, error):
    errs = [error(sampler, n) for n in ns]
    assert abs(slope(ns, errs) - order) < 0.25, (slope(ns, errs), errs)


# ---- bfloat16 networks on the new grids --------------------------------------------
class Bf16Net(eqx.Module):
    """`Net` computing in bfloat16 (its ᾱ table, input and output)."""

    net: Net

    def __call__(self, params, x, n, cond):
        inner = Net(self.net.ab.astype(jnp.bfloat16), self.net.kind, self.net.flow)
        return inner(None, x.astype(jnp.bfloat16), n, cond)


class Bf16EDMNet(eqx.Module):
    def __call__(self, params, u, c_noise, cond):
        return EDMNet("epsilon")(params, u.astype(jnp.bfloat16),
                                 c_noise.astype(jnp.bfloat16), cond)


def _sample(model, schedule, ts, sampler, x_T):
    return aj.sample(model, None, x_T, schedule=schedule, ts=ts, sampler=sampler)


def _timesteps_seen(setup):
    """The network's timestep at each grid time, computed in float32 as `aj.sample`
    passes it with a float32 state."""
    net = setup.model.model
    ts = jnp.asarray(setup.ts[:-1], jnp.float32)
    return np.asarray(jax.vmap(lambda t: net.timestep(setup.schedule, t))(ts))


@pytest.mark.parametrize("grid", [
    dict(use_karras_sigmas=True), dict(use_lu_lambdas=True),
    dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True),
    dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"),
], ids=lambda g: next(iter(g)))
def test_bfloat16_network_on_new_grids(grid):
    n = 20
    kw = (SD if "use_flow_sigmas" not in grid else {}) | grid
    sched = DPM64(**kw)
    config = config_of(sched)
    sched.set_timesteps(n)
    net = Net(jnp.asarray(sched.alphas_cumprod.numpy()),
              kw.get("prediction_type", "epsilon"), "use_flow_sigmas" in grid)
    setup = aj.from_diffusers(config, n, model=Bf16Net(net))
    seen = _timesteps_seen(setup)
    np.testing.assert_array_equal(seen, sched.timesteps.numpy())  # none collided
    low = _sample(setup.model, setup.schedule, setup.ts, setup.sampler,
                  jnp.asarray(X_T, jnp.float32))
    ref = run_vp(sched, torch_net(sched, net.kind, net.flow), X_T)
    assert low.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(low)))
    assert np.max(np.abs(np.asarray(low, np.float64) - ref)) < 0.05


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_bfloat16_network_on_edm_grids(schedule):
    n = 20
    sched = EDMDPM64(sigma_schedule=schedule)
    config = dict(sched.config) | {"_class_name": "EDMDPMSolverMultistepScheduler"}
    setup = aj.from_diffusers(config, n, model=Bf16EDMNet())
    full = aj.from_diffusers(config, n, model=EDMNet("epsilon"))
    z = jnp.asarray(X_T / 1.5)
    low = setup.final(_sample(setup.model, setup.schedule, setup.ts, setup.sampler,
                              setup.initial(z.astype(jnp.float32))))
    ref = full.final(_sample(full.model, full.schedule, full.ts, full.sampler,
                             full.initial(z)))
    assert low.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(low)))
    assert np.max(np.abs(np.asarray(low, np.float64) - np.asarray(ref))) < 0.05
    # c_noise = ¼ log σ from the float32 grid: distinct at every step.
    c_noise = 0.25 * np.log(np.asarray(setup.ts[:-1], np.float32))
    assert len(np.unique(c_noise)) == n


def test_continuous_adjoints_refuse_thresholding_by_name():
    sampler = aj.DPMSolverPP(thresholding=(0.9, 1.5))
    for adjoint in (aj.AdjointDEIS(), aj.RecordedAdjoint(), aj.InterpolatedAdjoint(),
                    aj.AdjointDPM(), aj.ReversibleAdjoint()):
        why = r"dynamic thresholding to x̂_0 at every step \(thresholding\)"
        with pytest.raises(ValueError, match=why):
            adjoint.check_sampler(sampler)
    for sampler in (aj.SDEDPMSolverPP(thresholding=(0.9, 1.5)),
                    aj.DPMSolver(thresholding=(0.9, 1.5))):
        with pytest.raises(ValueError, match="thresholding"):
            aj.AdjointDEIS().check_sampler(sampler)
    aj.DTO().check_sampler(sampler)


@pytest.mark.parametrize("grid", [
    dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
    dict(use_beta_sigmas=True), dict(use_flow_sigmas=True, flow_shift=3.0),
], ids=lambda g: next(iter(g)))
def test_unbound_network_maps_the_noise_level_to_diffusers_timesteps(grid):
    """`aj.diffusers_model(model, config)` (no grid) maps the noise level to the
    timestep diffusers' rule gives it (`_sigma_to_t` rounded or truncated, int(T σ)):
    on the grid it agrees with the grid-bound table."""
    sched = DPM64(**(SD if "use_flow_sigmas" not in grid else {}), **grid)
    config = config_of(sched)
    sched.set_timesteps(25)
    setup = aj.from_diffusers(config, 25)
    net = aj.diffusers_model(Net(jnp.zeros(1), "epsilon", False), config).model
    tmap = lambda t: net.timestep(setup.schedule, t)
    seen = np.asarray(jax.vmap(tmap)(setup.ts[:-1]))
    np.testing.assert_array_equal(seen, sched.timesteps.numpy())
