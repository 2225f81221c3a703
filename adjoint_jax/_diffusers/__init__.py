"""The diffusers interop layer: reading diffusers scheduler configs into `aj`
schedules, grids, samplers and model adapters. It sits above the samplers (nothing
below it knows diffusers exists) and imports no diffusers: a config is a plain
mapping. One module per family of scheduler classes; `_setup.FAMILIES` lists them.
"""

from ._config import betas_from_config as betas_from_config
from ._setup import DiffusersSetup as DiffusersSetup
from ._setup import diffusers_model as diffusers_model
from ._setup import diffusers_sampler as diffusers_sampler
from ._setup import diffusers_schedule as diffusers_schedule
from ._setup import diffusers_timesteps as diffusers_timesteps
from ._setup import discrete_timestep_model as discrete_timestep_model
from ._setup import from_diffusers as from_diffusers
