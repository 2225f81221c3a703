"""Benchmark problems and measurement tools (see `adjoint-jax compare`)."""

from ._mixture import MixtureProblem as MixtureProblem
from ._problems import GaussianProblem as GaussianProblem
from ._problems import MLPProblem as MLPProblem
from ._registry import parse as parse
from ._count import count_evals as count_evals
from ._count import EvalCount as EvalCount
