"""Parity of `aj.from_diffusers` with diffusers' `KDPM2DiscreteScheduler`
(`aj.KDPM2()`: DPM-Solver-2 at the log-SNR midpoint) and
`KDPM2AncestralDiscreteScheduler` (`aj.KDPM2Ancestral()`, the same normals),
float64-patched; their refusals are in `test_diffusers_euler_heun.py`. Harness:
`tests/diffusers64_euler.py`."""

import pytest

import adjoint_jax as aj

from .diffusers64_euler import KDPM2_64, KDPM2A64, NS, SD, compare, kdpm2_points


pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]


KDPM2_CASES = [
    # Timesteps a function of σ (log-index): no table.
    ("leading", dict(timestep_spacing="leading", steps_offset=1), False),
    ("exponential, scaled_linear", dict(SD, use_exponential_sigmas=True), False),
    ("beta", dict(use_beta_sigmas=True), False),
    # Fractional linspace timesteps / rounded Karras ones: a (time, timestep) table.
    ("linspace", {}, True),
    (
        "Karras (rounded timesteps), v-prediction",
        dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"),
        True,
    ),
]


@pytest.mark.parametrize("name,kw,table", KDPM2_CASES, ids=[c[0] for c in KDPM2_CASES])
def test_kdpm2(name, kw, table):
    for n in NS:
        setup, seen, _ = compare(
            f"KDPM2: {name}", KDPM2_64(**kw), n, eval_times=kdpm2_points
        )
        assert setup.sampler == aj.KDPM2() and len(seen) == 2 * n - 1
        kind = setup.model.model.timestep.kind
        assert kind == ("table" if table else "log-index")


@pytest.mark.parametrize(
    "name,kw",
    [
        ("trailing", dict(SD, timestep_spacing="trailing")),
        (
            "exponential, v-prediction",
            dict(use_exponential_sigmas=True, prediction_type="v_prediction"),
        ),
    ],
    ids=["trailing", "exponential, v-prediction"],
)
def test_kdpm2_ancestral(name, kw):
    for n in NS:
        setup, _, drawn = compare(
            f"KDPM2 a: {name}", KDPM2A64(**kw), n, noise=True, eval_times=kdpm2_points
        )
        # diffusers draws one normal per step but the last (to σ = 0).
        assert setup.sampler == aj.KDPM2Ancestral() and drawn == n - 1
