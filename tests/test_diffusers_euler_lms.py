"""Parity of `aj.from_diffusers` with diffusers' `LMSDiscreteScheduler` (`aj.LMS()`)
and of `aj.EulerChurn` with `EulerDiscreteScheduler.step(s_churn=, s_tmin=, s_tmax=,
s_noise=)` (the same normals), float64-patched. Harness:
`tests/diffusers64_euler.py`."""

import pytest

import adjoint_jax as aj

from .diffusers64_euler import EULER64, LMS64, NS, SD, compare


pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]


LMS_CASES = [
    ("linspace", {}),
    (
        "leading, steps_offset, v-prediction",
        dict(
            SD,
            timestep_spacing="leading",
            steps_offset=1,
            prediction_type="v_prediction",
        ),
    ),
    ("trailing", dict(timestep_spacing="trailing")),
    ("Karras, sample", dict(SD, use_karras_sigmas=True, prediction_type="sample")),
    ("exponential", dict(use_exponential_sigmas=True)),
    ("beta", dict(SD, use_beta_sigmas=True, prediction_type="sample")),
]


@pytest.mark.parametrize("name,kw", LMS_CASES, ids=[c[0] for c in LMS_CASES])
def test_lms(name, kw):
    for n in NS:
        setup, _, _ = compare(f"LMS: {name}", LMS64(**kw), n)
        assert setup.sampler == aj.LMS()


def test_lms_step_order_argument():
    """`step(order=k)` is `aj.LMS(order=k)`."""
    for k, n in ((2, 7), (3, 20)):
        compare(
            f"LMS: step(order={k})",
            LMS64(),
            n,
            sampler=aj.LMS(order=k),
            step_kw=dict(order=k),
        )


CHURN_CASES = [  # (name, config, step kwargs, num_sigmas beyond the grid's step count)
    ("s_churn 2, linspace", {}, dict(s_churn=2.0), 0),
    (
        "window [0.5, 5] of a Karras grid, s_noise, v-prediction",
        dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"),
        dict(s_churn=3.0, s_tmin=0.5, s_tmax=5.0, s_noise=1.003),
        0,
    ),
    (
        "γ capped at √2 − 1, s_tmin, sample",
        dict(prediction_type="sample"),
        dict(s_churn=10.0, s_tmin=0.1),
        0,
    ),
    (
        "log_linear (N + 1 sigmas)",
        dict(interpolation_type="log_linear"),
        dict(s_churn=1.5),
        1,
    ),
]


@pytest.mark.parametrize(
    "name,kw,step_kw,extra", CHURN_CASES, ids=[c[0] for c in CHURN_CASES]
)
def test_euler_churn(name, kw, step_kw, extra):
    for n in NS:
        sampler = aj.EulerChurn(
            **step_kw,
            prediction=kw.get("prediction_type", "epsilon"),
            num_sigmas=n + extra if extra else None,
        )
        setup, _, drawn = compare(
            f"Euler churn: {name}",
            EULER64(**kw),
            n,
            noise=True,
            step_kw=step_kw,
            sampler=sampler,
        )
        churned = sampler.churn_steps(setup.schedule, setup.ts)
        assert drawn == len(churned) > 0
