from ._adjoint_deis import AdjointDEIS as AdjointDEIS
from ._adjoint_dpm import AdjointDPM as AdjointDPM
from ._base import AbstractAdjoint as AbstractAdjoint
from ._continuous import AbstractContinuousAdjoint as AbstractContinuousAdjoint
from ._dto import DTO as DTO
from ._interpolated import InterpolatedAdjoint as InterpolatedAdjoint
from ._recorded import RecordedAdjoint as RecordedAdjoint
from ._reversible import ReversibleAdjoint as ReversibleAdjoint
