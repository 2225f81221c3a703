"""Benchmark problems and measurement tools (see `adjoint-jax compare`)."""

from ._compare import compare as compare
from ._count import EvalCount as EvalCount
from ._count import count_evals as count_evals
from ._mixture import MixtureProblem as MixtureProblem
from ._pairs import default_adjoints as default_adjoints
from ._pairs import default_samplers as default_samplers
from ._pairs import valid_pairs as valid_pairs
from ._problem import Problem as Problem
from ._problem import make_problem as make_problem
from ._problems import GaussianProblem as GaussianProblem
from ._problems import MLPProblem as MLPProblem
from ._registry import parse as parse
