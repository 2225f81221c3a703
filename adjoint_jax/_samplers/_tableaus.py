"""Butcher tableaus of the explicit Runge–Kutta methods behind `aj.ExpRK`, as float64
numpy constants (fixed at trace time: the stages are unrolled).

A tableau (c, A, b) steps y' = f(τ, y) from τ₀ by Δτ as

    k_i = f(τ₀ + c_i Δτ, y₀ + Δτ Σ_{j<i} a_ij k_j),    y₁ = y₀ + Δτ Σ_i b_i k_i,

and an embedded pair adds b̂, a solution of lower order from the same stages, whose
difference y₁ − ŷ₁ = Δτ Σ (b_i − b̂_i) k_i estimates the local error of ŷ₁. The FSAL
pairs (bosh3, dopri5, tsit5) have a last stage at c = 1 with a_{s,:} = b and b_s = 0:
only the embedded solution uses it.

Sources: Butcher (2016), Hairer–Nørsett–Wanner I (Dormand–Prince 5(4), Bogacki–
Shampine 3(2)); Tsitouras (2011), coefficients as printed in diffrax's
`diffrax/_solver/tsit5.py`; Lu et al. (2022), DPM-Solver-3 (r₁ = 1/3, r₂ = 2/3),
whose classical limit h → 0 is Heun's third-order method. `tests/test_exp_rk.py`
checks every tableau against the order conditions (all rooted trees up to its order).
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Tableau:
    """c (s,), A (s, s) strictly lower triangular, b (s,), and the embedded b̂ (s,) or
    None; `order` of b, `embedded_order` of b̂."""

    c: np.ndarray
    a: np.ndarray
    b: np.ndarray
    b_hat: np.ndarray | None
    order: int
    embedded_order: int | None = None

    @property
    def stages(self) -> int:
        """Stages of the solution (the FSAL stage, used only by b̂, not counted)."""
        return int(np.flatnonzero(self.b)[-1]) + 1

    @property
    def error_stages(self) -> int:
        """Stages of the solution and its embedded estimate together."""
        if self.b_hat is None:
            return self.stages
        return max(self.stages, int(np.flatnonzero(self.b_hat)[-1]) + 1)


def _make(c, rows, b, order, b_hat=None, embedded_order=None) -> Tableau:
    s = len(c)
    a = np.zeros((s, s), np.float64)
    for i, row in enumerate(rows, start=1):
        a[i, : len(row)] = row
    return Tableau(
        np.asarray(c, np.float64), a, np.asarray(b, np.float64),
        None if b_hat is None else np.asarray(b_hat, np.float64), order, embedded_order,
    )


EULER = _make([0.0], [], [1.0], 1)

MIDPOINT = _make([0.0, 0.5], [[0.5]], [0.0, 1.0], 2)

# The explicit trapezoidal rule, with Euler embedded.
HEUN = _make([0.0, 1.0], [[1.0]], [0.5, 0.5], 2, b_hat=[1.0, 0.0], embedded_order=1)

# Bogacki–Shampine 3(2), FSAL.
BOSH3 = _make(
    [0.0, 1 / 2, 3 / 4, 1.0],
    [[1 / 2], [0.0, 3 / 4], [2 / 9, 1 / 3, 4 / 9]],
    [2 / 9, 1 / 3, 4 / 9, 0.0],
    3,
    b_hat=[7 / 24, 1 / 4, 1 / 3, 1 / 8],
    embedded_order=2,
)

RK4 = _make(
    [0.0, 0.5, 0.5, 1.0],
    [[0.5], [0.0, 0.5], [0.0, 0.0, 1.0]],
    [1 / 6, 1 / 3, 1 / 3, 1 / 6],
    4,
)

# Dormand–Prince 5(4), FSAL.
_DOPRI5_B = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]
DOPRI5 = _make(
    [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0],
    [
        [1 / 5],
        [3 / 40, 9 / 40],
        [44 / 45, -56 / 15, 32 / 9],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
        _DOPRI5_B[:6],
    ],
    _DOPRI5_B,
    5,
    b_hat=[5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100,
           1 / 40],
    embedded_order=4,
)

# Tsitouras 5(4), FSAL (Tsitouras 2011; the digits of diffrax's table, rounded to
# float64 by the parser).
_TSIT5_B = [
    0.09646076681806522951816731316512876333711995238157997181903319145764851595,
    0.01,
    0.47988965041449957477524953229059651991304046219903324883326349442545420602,
    1.37900857410374189319227482185687277075646264309136052593494006739724569803,
    -3.29006951543608067990104758571136385011568329089493615853129679959481381105,
    2.32471052409977398241535591839876579610906023322296241194406004631446539105,
    0.0,
]
TSIT5 = _make(
    [0.0, 0.161, 0.327, 0.9,
     0.98002554090450968572981028628702459549421379795630247688547642932211959508, 1.0,
     1.0],
    [
        [0.161],
        [-0.00848065549235698854442687425023077467512117739343039153736923424529419298,
         0.33548065549235698854442687425023077467512117739343039153736923424529419298],
        [2.89715305710549343213043259419293876492488728770186649031486669345502379514,
         -6.35944848997507484314815991238382562595270064741562670330592885020728872124,
         4.36229543286958141101772731819088686102781335971376021299106215675226492610],
        [5.32586482843925660442887792084051131783647625309704010120236039772798164884,
         -11.7488835640628278777471703397857729618874417825986289928866692800902061566,
         7.49553934288983620830460478456435815565867916151851872101013281621379364834,
         -0.0924950663617552492565020793320719161134998340602953524403475045293046941],
        [5.86145544294642002865925148698264789039433766616481443481815723905250733977,
         -12.9209693178471092917061186817833593954178075195574345916631225043992851927,
         8.15936789857615864318040079453925348518191832113505330574835542395500922265,
         -0.0715849732814009972245305425258297386912721314736354488272113965954637240,
         -0.0282690503940683829090030572127122414671763362687977000761787620127676457],
        _TSIT5_B[:6],
    ],
    _TSIT5_B,
    5,
    b_hat=[
        0.09468075576583945807478876255758922856117527357724631226139574065785592789,
        0.00918356554034325309677636393664531375981374624098409523890593953292295525,
        0.48777052842476157078556425996312282415166919597613637743652162403040716516,
        1.23429756693047898565510967388423765403553993074819284831542583350048487838,
        -2.70771234998352545488110997505932167068960516693819737876399225571444440715,
        1.86662841817058703575371939956621149866625550524412259399659160284125832897,
        1 / 66,
    ],
    embedded_order=4,
)

# DPM-Solver-3's nodes (r₁ = 1/3, r₂ = 2/3); as h → 0 its update is Heun's
# third-order method, b = (1/4, 0, 3/4) with a₃₂ = 2/3.
DPM3 = _make([0.0, 1 / 3, 2 / 3], [[1 / 3], [0.0, 2 / 3]], [1 / 4, 0.0, 3 / 4], 3)

TABLEAUS: dict[str, Tableau] = {
    "euler": EULER,
    "midpoint": MIDPOINT,
    "heun": HEUN,
    "bosh3": BOSH3,
    "rk4": RK4,
    "dopri5": DOPRI5,
    "tsit5": TSIT5,
    "dpm3": DPM3,
}
