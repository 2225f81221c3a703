"""Small trained models shipped with `adjoint_jax`, for examples, tests and the
benchmark's "real network" case.

- `aj.zoo.digits()`: a class-conditional ε-network for the 8×8 scikit-learn digits
  (Equinox) and a digit classifier whose penultimate layer is an embedding (Flax).

Importing this module imports neither Flax nor the weights; `digits()` loads them.
"""

from ._zoo import Digits as Digits
from ._zoo import DigitsModel as DigitsModel
from ._zoo import digits as digits
