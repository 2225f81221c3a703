from ._base import AbstractAdjoint as AbstractAdjoint
from ._dto import DTO as DTO
from ._adjoint_deis import AdjointDEIS as AdjointDEIS
from ._continuous import AbstractContinuousAdjoint as AbstractContinuousAdjoint
from ._interpolated import InterpolatedAdjoint as InterpolatedAdjoint
from ._recorded import RecordedAdjoint as RecordedAdjoint
