"""Digit blending with time-scheduled conditioning: as `blend_digits.py`, but the
conditioning embedding is an `aj.Scheduled` with one value per sampler step
(Theorem 3 of the AdjointDEIS paper: the gradient for step i's value is the adjoint
integrated over that step), so early (coarse-structure) and late (detail) steps can
lean towards different sources.

    python examples/scheduled_conditioning.py --adjoint 'AdjointDEIS()'

Reports the same figures as `blend_digits.py` (verified blends against the baseline,
NFE) and saves the grid and loss curve as scheduled_conditioning*.png.
"""

import sys

import blend_digits


def run(argv=None) -> dict:
    return blend_digits.run(argv, scheduled=True, name="scheduled_conditioning",
                           doc=__doc__)


if __name__ == "__main__":
    run(sys.argv[1:])
