"""diffusers' scheduler classes in float64 for `benchmarks/pipelines.py` (the pipeline
table): every class a pipeline set-up uses, looked up in the float64 modules of the
scheduler families (`tests/diffusers64*.py`), and the classes no family module has,
patched here the same way (`tests/diffusers64._patched`: each float32 cast in the
methods the pipelines run becomes float64, each replacement asserting its count).

`float64_class(name)` returns the float64 subclass of the diffusers class `name`, or
raises LookupError naming the modules it looked in.
"""

import importlib

from diffusers import CogVideoXDPMScheduler

from .diffusers64 import _globals_with_f64_betas, _patched


def _cogvideox_dpm():
    """CogVideoXDPMScheduler: float32 betas (linear, trained) and final ᾱ; its
    scaled-linear betas are float64 already."""
    cls = CogVideoXDPMScheduler
    glb = _globals_with_f64_betas(cls)
    init = _patched(
        cls.__init__,
        [
            ("dtype=torch.float32", "dtype=torch.float64", 2),
            ("torch.tensor(1.0)", "torch.tensor(1.0, dtype=torch.float64)", 1),
        ],
        glb,
    )
    return type("CogVideoXDPMScheduler64", (cls,), {"__init__": init, "_glb": glb})


COGVIDEOX_DPM64 = _cogvideox_dpm()

# class name → (module under tests/, attribute): the scheduler families' own float64
# classes first; this module's for the classes none of them has.
_WHERE = {
    "DDIMScheduler": ("diffusers64", "DDIM64"),
    "DDPMScheduler": ("diffusers64", "DDPM64"),
    "DPMSolverMultistepScheduler": ("diffusers64", "DPM64"),
    "FlowMatchEulerDiscreteScheduler": ("diffusers64", "FLOW64"),
    "EulerDiscreteScheduler": ("diffusers64_euler", "EULER64"),
    "EulerAncestralDiscreteScheduler": ("diffusers64_euler", "EULER_A64"),
    "HeunDiscreteScheduler": ("diffusers64_euler", "HEUN64"),
    "LMSDiscreteScheduler": ("diffusers64_euler", "LMS64"),
    "KDPM2DiscreteScheduler": ("diffusers64_euler", "KDPM2_64"),
    "KDPM2AncestralDiscreteScheduler": ("diffusers64_euler", "KDPM2A64"),
    "UniPCMultistepScheduler": ("diffusers64_unipc_pndm", "UNIPC64"),
    "PNDMScheduler": ("diffusers64_unipc_pndm", "PNDM64"),
    "LCMScheduler": ("diffusers64_flow_lcm", "LCM64"),
    "TCDScheduler": ("diffusers64_flow_lcm", "TCD64"),
    "CogVideoXDDIMScheduler": ("diffusers64_ddim", "COGVIDEOX64"),
    "DPMSolverSinglestepScheduler": ("diffusers64_singlestep", "SINGLESTEP64"),
    "DEISMultistepScheduler": ("diffusers64_singlestep", "DEIS64"),
    "DPMSolverSDEScheduler": ("diffusers64_singlestep", "SDE64"),
    "FlowMatchHeunDiscreteScheduler": ("diffusers64_euler", "FLOW_HEUN64"),
    "EDMDPMSolverMultistepScheduler": ("diffusers64_dpm", "EDMDPM64"),
    "EDMEulerScheduler": ("diffusers64_dpm", "EDMEULER64"),
    "CogVideoXDPMScheduler": ("diffusers64_pipelines", "COGVIDEOX_DPM64"),
}


def float64_class(name: str):
    """The float64 subclass of diffusers' scheduler class `name`."""
    if name not in _WHERE:
        raise LookupError(
            f"no float64 diffusers class for {name!r} (none of tests/diffusers64*.py)"
        )
    module, attr = _WHERE[name]
    try:
        found = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
    except (ImportError, AttributeError) as e:
        raise LookupError(
            f"no float64 diffusers class for {name!r}: tests/{module}.py: {e}"
        ) from e
    if found.__mro__[1].__name__ != name:
        raise LookupError(f"tests/{module}.{attr} is not a {name} subclass")
    return found
