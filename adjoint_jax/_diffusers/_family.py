"""What a scheduler family module provides (one module per family of diffusers
scheduler classes), and the plan it returns."""

import abc
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .._samplers._base import AbstractSampler
from .._schedule import AbstractSchedule
from ._config import Keys


class Plan(NamedTuple):
    """How `aj.sample` runs a scheduler's loop: the grid `ts` (float64), the sampler,
    and the factors from the pipeline's standard-normal draw z to `aj`'s x_T
    (`init_scale`) and from `aj`'s x_0 to the pipeline's final latents
    (`final_scale`). `family`, when set, is the family bound to this plan's
    `set_timesteps` arguments (the network's timesteps on this grid, a wider time
    range), which `from_diffusers` asks for the schedule and the network instead of
    the registry's (whose `network` sees the config only)."""

    ts: np.ndarray
    sampler: AbstractSampler
    init_scale: float = 1.0
    final_scale: float = 1.0
    family: "Family | None" = None


class Family(abc.ABC):
    """A family of diffusers scheduler classes reproduced by `aj` samplers.

    `keys` maps each class name of the family to its config `Keys`; the methods get
    the class name and a config whose keys were checked."""

    keys: ClassVar[dict[str, Keys]]

    @abc.abstractmethod
    def schedule(self, config: Mapping[str, Any], name: str) -> AbstractSchedule:
        """The schedule the network was trained with."""

    @abc.abstractmethod
    def network(self, model: Callable, config: Mapping[str, Any], name: str) -> Callable:
        """`model(params, x, timestep, cond)` (as the pipeline calls it) as an
        `aj.sample` model."""

    @abc.abstractmethod
    def plan(
        self,
        config: Mapping[str, Any],
        name: str,
        num_steps: int | None,
        *,
        sigmas: np.ndarray | None,
        timesteps: np.ndarray | None,
        mu: float | None,
        eta: float,
    ) -> Plan:
        """The grid and sampler of `set_timesteps(num_steps, sigmas=, timesteps=,
        mu=)` followed by the scheduler's `step` loop."""


def refuse_args(name: str, **given) -> None:
    """Raises for `set_timesteps` arguments `name`'s `set_timesteps` does not take."""
    bad = [k for k, v in given.items() if v is not None]
    if bad:
        raise ValueError(
            f"{name}.set_timesteps takes no `{bad[0]}`; pass num_steps only "
            f"(or the arguments its set_timesteps takes)."
        )
