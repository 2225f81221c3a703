"""Benchmark problems and measurement tools (see `adjoint-jax compare`)."""

from ._compare import Problem as Problem
from ._compare import compare as compare
from ._compare import default_adjoints as default_adjoints
from ._compare import default_samplers as default_samplers
from ._compare import make_problem as make_problem
from ._compare import valid_pairs as valid_pairs
from ._count import EvalCount as EvalCount
from ._count import count_evals as count_evals
from ._mixture import MixtureProblem as MixtureProblem
from ._problems import GaussianProblem as GaussianProblem
from ._problems import MLPProblem as MLPProblem
from ._registry import parse as parse
