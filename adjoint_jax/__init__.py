"""adjoint_jax: gradients through diffusion-model sampling, in JAX.

The public surface is this module; everything else is private.
"""

import importlib.metadata

from . import zoo as zoo
from ._adaptive import adaptive_time_grid as adaptive_time_grid
from ._adjoint_matching import adjoint_matching_loss as adjoint_matching_loss
from ._adjoint_matching import lean_adjoint as lean_adjoint
from ._adjoint_matching import memoryless_diffusion as memoryless_diffusion
from ._adjoints import DTO as DTO
from ._adjoints import AbstractAdjoint as AbstractAdjoint
from ._adjoints import AbstractContinuousAdjoint as AbstractContinuousAdjoint
from ._adjoints import AbstractCustomAdjoint as AbstractCustomAdjoint
from ._adjoints import AdjointDEIS as AdjointDEIS
from ._adjoints import AdjointDPM as AdjointDPM
from ._adjoints import InterpolatedAdjoint as InterpolatedAdjoint
from ._adjoints import RecordedAdjoint as RecordedAdjoint
from ._adjoints import ReversibleAdjoint as ReversibleAdjoint
from ._adjoints import Truncated as Truncated
from ._diffusers import DiffusersSetup as DiffusersSetup
from ._diffusers import diffusers_model as diffusers_model
from ._diffusers import diffusers_sampler as diffusers_sampler
from ._diffusers import diffusers_schedule as diffusers_schedule
from ._diffusers import diffusers_timesteps as diffusers_timesteps
from ._diffusers import discrete_timestep_model as discrete_timestep_model
from ._diffusers import from_diffusers as from_diffusers
from ._estimators import draft_lv as draft_lv
from ._estimators import trajectory_surrogate as trajectory_surrogate
from ._implicit_diffusion import ImplicitDiffusion as ImplicitDiffusion
from ._implicit_diffusion import ImplicitDiffusionState as ImplicitDiffusionState
from ._model import AbstractPredictor as AbstractPredictor
from ._model import Scheduled as Scheduled
from ._model import as_eps as as_eps
from ._model import cfg as cfg
from ._regularisers import chi_norm_regulariser as chi_norm_regulariser
from ._regularisers import dno_regulariser as dno_regulariser
from ._sample import sample as sample
from ._samplers import BDIA as BDIA
from ._samplers import BELM as BELM
from ._samplers import DDIM as DDIM
from ._samplers import DEIS as DEIS
from ._samplers import EDICT as EDICT
from ._samplers import KDPM2 as KDPM2
from ._samplers import LCM as LCM
from ._samplers import LMS as LMS
from ._samplers import PNDM as PNDM
from ._samplers import TCD as TCD
from ._samplers import AbstractMultistepSampler as AbstractMultistepSampler
from ._samplers import AbstractOneStepSampler as AbstractOneStepSampler
from ._samplers import AbstractReversibleSampler as AbstractReversibleSampler
from ._samplers import AbstractSampler as AbstractSampler
from ._samplers import AbstractSDESampler as AbstractSDESampler
from ._samplers import AsyncLeapfrog as AsyncLeapfrog
from ._samplers import CogVideoXDPM as CogVideoXDPM
from ._samplers import DPMSolver as DPMSolver
from ._samplers import DPMSolver1 as DPMSolver1
from ._samplers import DPMSolver2 as DPMSolver2
from ._samplers import DPMSolverPP as DPMSolverPP
from ._samplers import DPMSolverSDE as DPMSolverSDE
from ._samplers import DPMSolverSinglestep as DPMSolverSinglestep
from ._samplers import EulerChurn as EulerChurn
from ._samplers import ExpRK as ExpRK
from ._samplers import Heun as Heun
from ._samplers import KDPM2Ancestral as KDPM2Ancestral
from ._samplers import McCallumFoster as McCallumFoster
from ._samplers import ReversibleHeun as ReversibleHeun
from ._samplers import SDEDPMSolver1 as SDEDPMSolver1
from ._samplers import SDEDPMSolverPP as SDEDPMSolverPP
from ._samplers import UniPC as UniPC
from ._schedule import AbstractSchedule as AbstractSchedule
from ._schedule import FlowMatching as FlowMatching
from ._schedule import VarianceExploding as VarianceExploding
from ._schedule import VPCosine as VPCosine
from ._schedule import VPDiscrete as VPDiscrete
from ._schedule import VPLinear as VPLinear
from ._time_grid import time_grid as time_grid


try:
    __version__ = importlib.metadata.version("adjoint_jax")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
