"""Parity of `aj.from_diffusers` with diffusers' `DPMSolverMultistepScheduler` in
float64 (`tests/diffusers64.DPM64`), option by option, at two step counts each (8,
below the 15 where `lower_order_final` acts, and 20), with the same noises for the
SDE variants; the refusals, by name; the grids diffusers refuses that we accept.

Both sides run the pipeline's network on Gaussian data N(μ, s²) elementwise: its
output at the *integer timestep diffusers passes* is the exact ε / x̂_0 / v of that
timestep's ᾱ (VP), or of σ' = (n + ½)/T (flow sigmas; the network only sees n), so
a wrong timestep, σ, order or coefficient shows at once. `aj.sample` is called
eagerly: it checks the grid at once and compiles its loop without run-time checks
(a program without host callbacks, which JAX's persistent compilation cache keeps;
under `eqx.filter_jit` with the grid traced it was compiled afresh on every run).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adjoint_jax as aj
from adjoint_jax._diffusers._dpm_tables import diffusers_index

from .diffusers64 import DPM64, run_vp


pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning",
    "ignore::FutureWarning",
)

MU, S = 0.7, 0.5
TOL = 1e-10
X_T = np.random.default_rng(0).standard_normal((2, 3, 4)) * 1.5
NOISE = np.random.default_rng(1).standard_normal((24, 2, 3, 4))
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
NS = (8, 20)
MAX_DIFF: dict[str, float] = {}  # case → largest |ours − diffusers| (for the report)


def gaussian_output(ab, sigma, x, mu, kind):
    """The exact output of a network of `kind` for Gaussian data at x = α x_0 + σ ε
    with α = √ᾱ (VP; `sigma` None) or α = 1 − σ (flow). Works for torch and jnp."""
    if sigma is None:
        a, s = ab**0.5, (1 - ab) ** 0.5
    else:
        a, s = 1 - sigma, sigma
    d = a * a * S * S + s * s
    eps = s * (x - a * mu) / d
    x0 = mu + a * S * S * (x - a * mu) / d
    outputs = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0,
               "flow_prediction": eps - x0}
    return outputs[kind]


class Net(eqx.Module):
    """The network as the pipeline calls it, `net(params, x, timestep, cond)`; the
    timestep must be an integer (diffusers' int64 timesteps). `params` is μ (or None:
    MU)."""

    ab: jax.Array
    kind: str = eqx.field(static=True)
    flow: bool = eqx.field(static=True)

    def __call__(self, params, x, n, cond):
        assert jnp.issubdtype(n.dtype, jnp.integer)
        mu = MU if params is None else params
        sigma = (n.astype(x.dtype) + 0.5) / 1000.0 if self.flow else None
        return gaussian_output(self.ab[n], sigma, x, mu, self.kind)


def torch_net(sched, kind, flow, mu=MU):
    ab = sched.alphas_cumprod.to(torch.float64)
    return lambda x, n: gaussian_output(ab[n], (n + 0.5) / 1000.0 if flow else None,
                                        x, mu, kind)


def config_of(sched) -> dict:
    return dict(sched.config) | {"_class_name": "DPMSolverMultistepScheduler"}


def _sample(model, schedule, ts, sampler, x_T, noise):
    return aj.sample(model, None, x_T, schedule=schedule, ts=ts, sampler=sampler,
                     noise=noise)


def ours(config, n, net, *, noise=None, timesteps=None, mu=None):
    setup = aj.from_diffusers(config, n, model=net, timesteps=timesteps, mu=mu)
    steps = len(setup.ts) - 1
    out = _sample(setup.model, setup.schedule, setup.ts, setup.sampler,
                  setup.initial(jnp.asarray(X_T)),
                  None if noise is None else jnp.asarray(noise[:steps]))
    return np.asarray(setup.final(out)), setup


def diffusers(kw, n, kind, noise=None, timesteps=None, mu=None):
    """diffusers' loop (`DPM64(**kw)`); returns the final latents, the scheduler and
    its config as diffusers saw it before `set_timesteps` (which may rewrite
    `flow_shift`)."""
    sched = DPM64(**kw)
    config = config_of(sched)
    sched.set_timesteps(n, timesteps=timesteps, mu=mu)
    flow = bool(kw.get("use_flow_sigmas", False))
    return run_vp(sched, torch_net(sched, kind, flow), X_T, noise=noise), sched, config


def agree(case, kw, n, *, noisy=False, timesteps=None, mu=None):
    kind = kw.get("prediction_type", "epsilon")
    noise = NOISE if noisy else None
    ref, sched, config = diffusers(kw, n, kind, noise, timesteps, mu)
    net = Net(jnp.asarray(sched.alphas_cumprod.numpy()), kind,
              bool(kw.get("use_flow_sigmas", False)))
    out, setup = ours(config, n, net, noise=noise, timesteps=timesteps, mu=mu)
    diff = float(np.max(np.abs(out - ref)))
    MAX_DIFF[case] = max(MAX_DIFF.get(case, 0.0), diff)
    assert diff < TOL, (case, n, diff)
    return out, setup


# case → (scheduler kwargs, stochastic?). Every option that changes the numbers, at
# NS = (8, 20) steps each (options combined where they are independent).
CASES = {
    "karras (DPM++ 2M Karras)": (SD | dict(use_karras_sigmas=True), False),
    "exponential sigmas": (SD | dict(use_exponential_sigmas=True), False),
    "beta sigmas": (SD | dict(use_beta_sigmas=True), False),
    "lu lambdas": (SD | dict(use_lu_lambdas=True), False),
    "karras, cosine betas (truncated timesteps), order 3, euler_at_final, sigma_min":
        (dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True, solver_order=3,
              euler_at_final=True, final_sigmas_type="sigma_min"), False),
    "exponential, sigma_min (identity last step dropped)":
        (dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min"), False),
    "lambda_min_clipped, cosine, trailing":
        (dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1,
              timestep_spacing="trailing"), False),
    "rescale_betas_zero_snr (2^-24), v_prediction, trailing":
        (SD | dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                   timestep_spacing="trailing"), False),
    "leading + steps_offset, sample prediction, order 1":
        (SD | dict(timestep_spacing="leading", steps_offset=1, prediction_type="sample",
                   solver_order=1), False),
    "order 3, lower_order_final=False, sigma_min":
        (SD | dict(solver_order=3, lower_order_final=False,
                   final_sigmas_type="sigma_min"), False),
    "sde-dpmsolver++ order 2 midpoint":
        (SD | dict(algorithm_type="sde-dpmsolver++"), True),
    "sde-dpmsolver++ order 3, karras":
        (SD | dict(algorithm_type="sde-dpmsolver++", solver_order=3,
                   use_karras_sigmas=True), True),
    "sde-dpmsolver++ heun, thresholding":
        (SD | dict(algorithm_type="sde-dpmsolver++", solver_type="heun",
                   thresholding=True, dynamic_thresholding_ratio=0.9,
                   sample_max_value=1.5), True),
    "dpmsolver order 3, v_prediction, sigma_min":
        (SD | dict(algorithm_type="dpmsolver", solver_order=3,
                   prediction_type="v_prediction", final_sigmas_type="sigma_min"),
         False),
    "dpmsolver heun, thresholding, sigma_min":
        (SD | dict(algorithm_type="dpmsolver", solver_type="heun", thresholding=True,
                   dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                   final_sigmas_type="sigma_min"), False),
    "sde-dpmsolver order 2 midpoint, sigma_min":
        (SD | dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
         True),
    "sde-dpmsolver heun, beta sigmas, euler_at_final, sigma_min":
        (SD | dict(algorithm_type="sde-dpmsolver", solver_type="heun",
                   use_beta_sigmas=True, euler_at_final=True,
                   final_sigmas_type="sigma_min"), True),
    "dpmsolver++ thresholding":
        (SD | dict(thresholding=True, dynamic_thresholding_ratio=0.9,
                   sample_max_value=1.5), False),
    "deis (= dpmsolver++), sigma_min":
        (SD | dict(algorithm_type="deis", final_sigmas_type="sigma_min"), False),
    "flow sigmas, flow_prediction (Sana)":
        (dict(use_flow_sigmas=True, prediction_type="flow_prediction"), False),
    "flow sigmas, flow_shift 3, order 3, sigma_min (VP sigma_min)":
        (dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
              solver_order=3, final_sigmas_type="sigma_min"), False),
    "flow sigmas, flow_shift 12 (beyond FlowMatching's t_max), sde-dpmsolver++":
        (dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=12.0,
              algorithm_type="sde-dpmsolver++"), True),
    "flow sigmas, epsilon prediction":
        (dict(use_flow_sigmas=True, flow_shift=3.0), False),
    "flow sigmas, v_prediction (diffusers' VP formula), dpmsolver":
        (dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="v_prediction",
              algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), False),
    "flow sigmas, sample prediction": (dict(use_flow_sigmas=True, flow_shift=3.0,
                                            prediction_type="sample"), False),
    "VP grid, flow_prediction (x0 = x - (sigma/alpha) u)":
        (SD | dict(prediction_type="flow_prediction"), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity(case):
    kw, noisy = CASES[case]
    outs = [agree(case, kw, n, noisy=noisy)[0] for n in NS]
    assert np.all(np.isfinite(outs[0]))


def test_options_change_the_result():
    """The options of the parity cases are not vacuous on this data: thresholding
    clamps x̂_0, and each σ-grid differs from the default grid."""
    sched = DPM64(**SD)
    net = Net(jnp.asarray(sched.alphas_cumprod.numpy()), "epsilon", False)
    base, _ = ours(config_of(sched), 8, net)
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "use_lu_lambdas", "thresholding"):
        kw = SD | {key: True, "dynamic_thresholding_ratio": 0.9,
                   "sample_max_value": 1.5}
        other, _ = ours(config_of(DPM64(**kw)), 8, net)
        assert np.max(np.abs(other - base)) > 1e-3, key


def test_dynamic_shifting_with_mu():
    kw = dict(use_flow_sigmas=True, prediction_type="flow_prediction",
              use_dynamic_shifting=True)
    for n in NS:
        agree("use_dynamic_shifting + mu (flow_shift = e^mu)", kw, n, mu=0.8)


def test_custom_timesteps():
    for steps in ([999, 850, 700, 520, 300, 160, 60, 10],
                  [999, 900, 800, 650, 500, 420, 300, 250, 200, 150, 120, 90, 70, 50,
                   40, 30, 20, 10, 5, 0]):
        agree("custom timesteps", SD, None, timesteps=steps)
    # Ending at timestep 0 with sigma_min: the identity step 0 → σ_min is dropped.
    _, setup = agree("custom timesteps", SD | dict(final_sigmas_type="sigma_min"), None,
                     timesteps=[999, 700, 400, 200, 100, 0])
    assert len(setup.ts) == 6 and setup.sampler.orders == (1, 2, 2, 2, 2)


def test_karras_grid_and_timesteps():
    """DPM++ 2M Karras is `aj.DPMSolverPP()` on t = `VPDiscrete.t_of_lam(−log σ_k)`,
    and the network sees diffusers' timesteps (rounded; truncated for exponential)."""
    for key in ("use_karras_sigmas", "use_exponential_sigmas"):
        sched = DPM64(**SD, **{key: True})
        sched.set_timesteps(25)
        net = Net(jnp.asarray(sched.alphas_cumprod.numpy()), "epsilon", False)
        setup = aj.from_diffusers(config_of(sched), 25, model=net)
        assert setup.sampler == aj.DPMSolverPP()
        sig = sched.sigmas.numpy()[:-1]
        lam = np.asarray(setup.schedule.lam(setup.ts[:-1]))
        np.testing.assert_allclose(np.exp(-lam), sig, rtol=1e-13)
        tmap = setup.model.model.timestep
        seen = np.asarray(jax.vmap(lambda t: tmap(setup.schedule, t))(setup.ts[:-1]))
        np.testing.assert_array_equal(seen, sched.timesteps.numpy())
    # Exponential truncates (int64 cast): rounding, Karras' rule, would disagree.
    ab = sched.alphas_cumprod.numpy()
    tau = diffusers_index(sig, np.log(np.sqrt((1 - ab) / ab)))
    assert np.any(np.round(tau) != sched.timesteps.numpy())


def _refused(kw, key, n=10, **args):
    with pytest.raises(ValueError, match=key):
        aj.from_diffusers({"_class_name": "DPMSolverMultistepScheduler"} | kw, n,
                          **args)


@pytest.mark.parametrize(
    "kw,key,args",
    [
        (dict(variance_type="learned"), "variance_type", {}),
        (dict(algorithm_type="unipc"), "algorithm_type", {}),
        (dict(solver_type="bh3"), "solver_type", {}),
        (dict(solver_order=4), "solver_order", {}),
        (dict(final_sigmas_type="one"), "final_sigmas_type", {}),
        (dict(timestep_spacing="middle"), "timestep_spacing", {}),
        (dict(prediction_type="score"), "prediction_type", {}),
        (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr", {}),
        (dict(use_karras_sigmas=True, use_exponential_sigmas=True),
         "use_exponential_sigmas", {}),
        (dict(use_flow_sigmas=True, use_beta_sigmas=True), "use_flow_sigmas", {}),
        (dict(use_karras_sigmas=True), "use_karras_sigmas",
         dict(timesteps=[999, 500, 10])),
        (dict(algorithm_type="sde-dpmsolver"), "final_sigmas_type", {}),
        (dict(algorithm_type="sde-dpmsolver", solver_order=3,
              final_sigmas_type="sigma_min"), "solver_order", {}),
        (dict(use_flow_sigmas=True), "use_dynamic_shifting", dict(mu=0.5)),
        (dict(use_flow_sigmas=True, use_dynamic_shifting=True,
              time_shift_type="linear"),
         "time_shift_type", dict(mu=0.5)),
        (dict(algorithm_type="dpmsolver", prediction_type="flow_prediction",
              final_sigmas_type="sigma_min"), "prediction_type", {}),
        (dict(use_beta_sigmas=True, solver_order=3, lower_order_final=False,
              final_sigmas_type="sigma_min"), "final_sigmas_type", dict(n=20)),
        (dict(use_exponential_sigmas=True, solver_type="heun",
              final_sigmas_type="sigma_min"), "final_sigmas_type", dict(n=20)),
        (dict(algorithm_type="sde-dpmsolver++", use_lu_lambdas=True,
              final_sigmas_type="sigma_min"), "final_sigmas_type", {}),
        ({}, "sigmas", dict(sigmas=[14.6, 1.0, 0.1])),
    ],
)
def test_refusals_name_the_key(kw, key, args):
    args = dict(args)
    n = args.pop("n", 10)
    if "timesteps" in args:
        n = None
    if key == "prediction_type" and "algorithm_type" in kw:
        with pytest.raises(ValueError, match=key):
            aj.from_diffusers({"_class_name": "DPMSolverMultistepScheduler"} | kw, n,
                              model=lambda p, x, t, c: x)
        return
    _refused(kw, key, n, **args)


@pytest.mark.parametrize("algorithm", ["dpmsolver", "deis"])
def test_sigma_zero_accepted_where_diffusers_raises(algorithm):
    """diffusers raises for `final_sigmas_type="zero"` with these algorithms (its
    check reads the algorithm before "deis" becomes dpmsolver++); the maths allows it:
    the last step to σ = 0 is the data prediction. We accept it and match diffusers'
    own steps before it (run on the "sigma_min" grid, whose σ agree but the last)
    followed by x̂_0."""
    with pytest.raises(ValueError, match="final_sigmas_type"):
        DPM64(**SD, algorithm_type=algorithm)
    for n in NS:
        ref_sched = DPM64(**SD, algorithm_type=algorithm, final_sigmas_type="sigma_min")
        ref_sched.set_timesteps(n)
        eps = torch_net(ref_sched, "epsilon", False)
        x = torch.as_tensor(X_T, dtype=torch.float64)
        for t in ref_sched.timesteps[:-1]:
            x = ref_sched.step(eps(x, int(t)), t, x).prev_sample
        ab = ref_sched.alphas_cumprod[int(ref_sched.timesteps[-1])].double()
        e = eps(x, int(ref_sched.timesteps[-1]))
        ref = ((x - (1 - ab) ** 0.5 * e) / ab**0.5).numpy()
        config = config_of(ref_sched) | {"final_sigmas_type": "zero"}
        out, setup = ours(config, n, Net(jnp.asarray(ref_sched.alphas_cumprod.numpy()),
                                         "epsilon", False))
        assert float(setup.ts[-1]) == 0.0
        diff = float(np.max(np.abs(out - ref)))
        MAX_DIFF[f"{algorithm} to sigma = 0 (diffusers raises)"] = diff
        assert diff < TOL, diff


def test_zero_snr_schedule_and_refusal_reason():
    """`rescale_betas_zero_snr`: ᾱ_{T−1} = 2⁻²⁴ as diffusers sets it, where that keeps
    ᾱ decreasing; the refusal for linear betas says why."""
    sched = DPM64(**SD, rescale_betas_zero_snr=True)
    schedule = aj.diffusers_schedule(config_of(sched))
    ab = np.asarray(schedule.alpha(jnp.asarray((np.arange(1000) + 1) / 1000))) ** 2
    np.testing.assert_allclose(ab, sched.alphas_cumprod.numpy(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="2⁻²⁴, above"):
        aj.from_diffusers({"_class_name": "DPMSolverMultistepScheduler",
                           "rescale_betas_zero_snr": True}, 10)
