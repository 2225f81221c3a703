"""Small trained models shipped with `adjoint_jax`, for examples, tests and the
benchmark's "real network" case.

- `aj.zoo.digits()`: a class-conditional ε-network for the 8×8 scikit-learn digits
  (Equinox) and a digit classifier whose penultimate layer is an embedding (Flax).
  `aj.zoo.digits(path=DIR)` loads the files that `examples/train_digits.py --out DIR`
  writes instead; either way the weights' SHA-256 is checked against `digits.json`.

Importing this module imports neither Flax nor the weights; `digits()` loads them.
"""

from ._zoo import Digits as Digits
from ._zoo import DigitsModel as DigitsModel
from ._zoo import digits as digits
