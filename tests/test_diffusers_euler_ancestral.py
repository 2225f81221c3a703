"""Parity of `aj.from_diffusers` with diffusers' `EulerAncestralDiscreteScheduler`
("Euler a"): `aj.DDIM(eta=1)` on its grid with the same standard normal per step
(harness: `tests/test_diffusers_euler.py`)."""

import pytest

import adjoint_jax as aj

from .diffusers64_euler import EULER_A64, NS, SD, compare


pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]


@pytest.mark.parametrize(
    "name,kw,ns",
    [
        ("linspace", {}, NS),
        (
            "SDXL-Turbo: trailing, 1 and 4 steps",
            dict(SD, timestep_spacing="trailing"),
            (1, 4),
        ),
        (
            "leading, v-prediction",
            dict(
                SD,
                timestep_spacing="leading",
                steps_offset=1,
                prediction_type="v_prediction",
            ),
            NS,
        ),
        (
            "zero-SNR v-prediction trailing",
            dict(
                SD,
                rescale_betas_zero_snr=True,
                prediction_type="v_prediction",
                timestep_spacing="trailing",
            ),
            NS,
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_euler_ancestral(name, kw, ns):
    for n in ns:
        setup, _, drawn = compare(f"Euler a: {name}", EULER_A64(**kw), n, noise=True)
        assert setup.sampler == aj.DDIM(eta=1.0) and drawn == n == len(setup.ts) - 1
