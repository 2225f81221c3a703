from ._base import AbstractAdjoint as AbstractAdjoint
from ._dto import DTO as DTO
