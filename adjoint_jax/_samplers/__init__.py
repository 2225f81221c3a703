from ._base import AbstractReversibleSampler as AbstractReversibleSampler
from ._base import AbstractSampler as AbstractSampler
from ._dpm_solver import DDIM as DDIM
from ._dpm_solver import DPMSolver1 as DPMSolver1
from ._dpm_solver import DPMSolver2 as DPMSolver2
from ._sde import SDEDPMSolver1 as SDEDPMSolver1
