"""The scheduler set-ups of public diffusers pipelines that `benchmarks/pipelines.py`
runs: each model repository's `scheduler/scheduler_config.json`, the scheduler
switch users make (`Cls.from_config(pipe.scheduler.config, **overrides)`), the
pipeline's default number of steps, what it passes to `set_timesteps` and `step`, and
how it draws its latents.

Every config names its source in a comment. A value marked `# UNCONFIRMED` could not
be checked against a copy of the file (it is written from the conversion script or
from memory of the model repository); everything else was read in a copy of the
file or in the code that writes it. Keys equal to diffusers' defaults are left out
where the source leaves them out: `Cls.from_config` fills them in the same way.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PipelineSetup:
    """One pipeline set-up.

    - `key`: a short id (`--only key`); `pipeline`, `model`: the pipeline class and the
        model repository; `scheduler`: the scheduler as users name it.
    - `config`: the shipped `scheduler_config.json`; `switch`: `(class name,
        overrides)` when the user swaps the scheduler with `Cls.from_config(config,
        **overrides)`, else None.
    - `steps`: the pipeline's `num_inference_steps` default (or the model card's).
    - `set_timesteps(config, steps)`: the keyword arguments the pipeline passes to
        `scheduler.set_timesteps` (`num_inference_steps`, or `sigmas`/`mu`), from the
        scheduler's final config; `step_kwargs`: the extra `step` arguments.
    - `init_sigma`: whether the pipeline multiplies its standard-normal draw by
        `scheduler.init_noise_sigma`.
    - `loop`: "standard" (`step(out, t, latents, **step_kwargs)`), "brownian" (the
        same, DPMSolverSDEScheduler given known Brownian increments in place of its
        torchsde tree), or "cogvideox-dpm" (`CogVideoXDPMScheduler.step(out, old_x0,
        t, t_prev, latents)`).
    - `sampler(setup, steps)`: the `aj` sampler of a `step` argument that
        `aj.from_diffusers` does not take (it replaces the setup's), or None.
    """

    key: str
    pipeline: str
    model: str
    scheduler: str
    config: dict[str, Any]
    steps: int
    switch: tuple[str, dict[str, Any]] | None = None
    set_timesteps: Callable[[dict, int], dict] | None = None
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    init_sigma: bool = True
    loop: str = "standard"
    notes: str = ""
    sampler: Callable | None = None

    def timesteps_kwargs(self, config: dict) -> dict:
        if self.set_timesteps is None:
            return {"num_inference_steps": self.steps}
        return self.set_timesteps(config, self.steps)


def calculate_shift(seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5,
                    max_shift=1.15):
    """μ of the FLUX/LTX pipelines: linear in the image token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + (base_shift - m * base_seq_len)


def _mu(config, seq_len):
    return calculate_shift(
        seq_len,
        config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5), config.get("max_shift", 1.15),
    )


def flux_timesteps(config, n):
    """FluxPipeline: σ = linspace(1, 1/n, n) and μ for 1024×1024: the packed latents
    have (1024/8/2)² = 4096 tokens."""
    return {"sigmas": np.linspace(1.0, 1 / n, n), "mu": _mu(config, (1024 // 16) ** 2)}


def ltx_timesteps(config, n):
    """LTXPipeline at its defaults (704×512, 161 frames; VAE compression 32 in space,
    8 in time): (160 // 8 + 1) · (512 // 32) · (704 // 32) = 21 · 16 · 22 = 7392
    tokens."""
    seq = ((161 - 1) // 8 + 1) * (512 // 32) * (704 // 32)
    return {"sigmas": np.linspace(1.0, 1 / n, n), "mu": _mu(config, seq)}


def hunyuan_timesteps(config, n):
    """HunyuanVideoPipeline: σ = linspace(1, 0, n + 1)[:-1], no μ."""
    return {"sigmas": np.linspace(1.0, 0.0, n + 1)[:-1]}


# ---- the shipped configs -------------------------------------------------------------

# stable-diffusion-v1-5/stable-diffusion-v1-5, scheduler/scheduler_config.json: read in
# the GitHub mirror HDRJ-One/runwayml-stable-diffusion-v1-5 (same file).
SD15 = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "thresholding": False,
    "trained_betas": None,
}

# stabilityai/stable-diffusion-2-1: the keys read in the mirror
# Vikas-2025/Hugging_face_sta_dif_2.1 (its Flax copy, FlaxDDIMScheduler); the PyTorch
# file names DDIMScheduler (the model card's pipeline).  # UNCONFIRMED: class name
SD21 = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}

# stabilityai/stable-diffusion-xl-base-1.0: quoted verbatim (diffusers 0.19.0.dev0) in
# several public projects found by the index (e.g. a scheduler test's
# SDXL_SCHEDULER_CONFIG and a commented copy from the HF cache).
SDXL = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None, "use_karras_sigmas": False,
}

# stabilityai/sdxl-turbo: EulerAncestralDiscreteScheduler with "trailing", as a public
# project quotes it and as diffusers' SDXL Turbo docs prescribe ("should use
# timestep_spacing='trailing'", 1–4 steps, guidance_scale=0). The mirror
# DeveloperRadleighPompei/sdxl (with sd_xl_turbo_1.0.safetensors) holds an older copy
# of the file (diffusers 0.24.0.dev0) with "linspace": SDXL_TURBO_LINSPACE.
SDXL_TURBO = {
    "_class_name": "EulerAncestralDiscreteScheduler", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "trailing",
    "trained_betas": None,
}
SDXL_TURBO_LINSPACE = {**SDXL_TURBO, "timestep_spacing": "linspace"}

# stabilityai/stable-diffusion-3-medium-diffusers (and 3.5-large): shift 3.
# UNCONFIRMED (from memory of the file; diffusers' SD3 docs and the shift-3 default of
# the SD3 training scripts agree).
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
       "shift": 3.0}

# black-forest-labs/FLUX.1-dev: quoted verbatim as the FLUX scheduler_config in
# ostris/ai-toolkit (found by the index).
FLUX_DEV = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
    "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}

# black-forest-labs/FLUX.1-schnell: read in the mirror edkamesh/FluX-optimized.
FLUX_SCHNELL = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
    "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
}

# PixArt-alpha/PixArt-XL-2-1024-MS and PixArt-alpha/PixArt-Sigma-XL-2-1024-MS: written
# by diffusers' scripts/convert_pixart_{alpha,sigma}_to_diffusers.py as
# `DPMSolverMultistepScheduler()` (all defaults).
PIXART = {"_class_name": "DPMSolverMultistepScheduler"}

# Efficient-Large-Model/Sana_1600M_1024px_diffusers: diffusers'
# scripts/convert_sana_to_diffusers.py, scheduler_type "flow-dpm_solver" (its default),
# flow_shift 3.0 below 4096 px.
SANA = {
    "_class_name": "DPMSolverMultistepScheduler", "flow_shift": 3.0,
    "use_flow_sigmas": True, "prediction_type": "flow_prediction",
}

# playgroundai/playground-v2.5-1024px-aesthetic: diffusers'
# loaders/single_file_utils.py writes this EDM config for Playground v2.5.
PLAYGROUND = {
    "_class_name": "EDMDPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
    "dynamic_thresholding_ratio": 0.995, "euler_at_final": False,
    "final_sigmas_type": "zero", "lower_order_final": True, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "rho": 7.0, "sample_max_value": 1.0,
    "sigma_data": 0.5,
    "sigma_max": 80.0, "sigma_min": 0.002, "solver_order": 2, "solver_type": "midpoint",
    "thresholding": False,
}

# kandinsky-community/kandinsky-2-2-decoder: DDPMScheduler on linear betas
# 0.00085–0.012 (the decoder tests' betas), from memory of the file.  # UNCONFIRMED:
# variance_type "learned_range" (the decoder's UNet predicts a variance in 4 extra
# channels, which KandinskyV22Pipeline passes on only to a scheduler with a learned
# variance type), steps_offset, timestep_spacing.
KANDINSKY22 = {
    "_class_name": "DDPMScheduler", "beta_end": 0.012, "beta_schedule": "linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
    "variance_type": "learned_range",
}

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers: quoted verbatim (diffusers 0.33.0.dev0) in public
# projects; diffusers' scripts/convert_wan_to_diffusers.py writes the same
# (flow_shift 3.0 for T2V).
WAN21 = {
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True,
    "num_train_timesteps": 1000, "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2,
    "solver_p": None, "solver_type": "bh2", "steps_offset": 0, "thresholding": False,
    "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
    "use_exponential_sigmas": False, "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}

# hunyuanvideo-community/HunyuanVideo: diffusers'
# scripts/convert_hunyuan_video_to_diffusers.py, `FlowMatchEulerDiscreteScheduler(
# shift=7.0)` (its --flow_shift default).
HUNYUAN = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 7.0}

# Lightricks/LTX-Video: diffusers' scripts/convert_ltx_to_diffusers.py (0.9.x) and the
# verbatim DIFFUSERS_SCHEDULER_CONFIG of public projects.
LTX = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 1024,
    "base_shift": 0.95, "invert_sigmas": False, "max_image_seq_len": 4096,
    "max_shift": 2.05, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.1,
    "use_beta_sigmas": False, "use_dynamic_shifting": True,
    "use_exponential_sigmas": False, "use_karras_sigmas": False,
}

# THUDM/CogVideoX-2b and -5b: diffusers' scripts/convert_cogvideox_to_diffusers.py
# (snr_shift_scale 3.0 for 2B, 1.0 for 5B, per its comment).
def _cogvideox(snr_shift_scale):
    return {
        "_class_name": "CogVideoXDDIMScheduler", "snr_shift_scale": snr_shift_scale,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True, "set_alpha_to_one": True,
        "timestep_spacing": "trailing",
    }


COGVIDEOX_2B, COGVIDEOX_5B = _cogvideox(3.0), _cogvideox(1.0)


# ---- the set-ups ---------------------------------------------------------------------

_SD = "StableDiffusionPipeline"
_XL = "StableDiffusionXLPipeline"
# The switches of diffusers' scheduler docs ("using-diffusers/schedulers"): DPM++ 2M
# Karras = DPMSolverMultistepScheduler(use_karras_sigmas=True), Euler a, …; LCM-LoRA
# from the LCM docs (LCMScheduler.from_config, 4 steps, guidance 1); TCD-LoRA from the
# h1t/TCD-SD15-LoRA and TCD-SDXL-LoRA model cards (4 steps, eta=0.3).
# UNCONFIRMED: eta (from memory of the model cards).
_KARRAS = ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})
_DPM_SDE_KARRAS = ("DPMSolverMultistepScheduler",
                   {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"})
_EULER_A = ("EulerAncestralDiscreteScheduler", {})
_TCD_ETA = 0.3

SETUPS: tuple[PipelineSetup, ...] = (
    PipelineSetup("sd15-pndm", _SD, "stable-diffusion-v1-5", "PNDM (shipped)",
                  SD15, 50),
    PipelineSetup("sd15-dpmpp2m-karras", _SD, "stable-diffusion-v1-5",
                  "DPM++ 2M Karras", SD15, 50, switch=_KARRAS),
    PipelineSetup("sd15-dpmpp2m-sde-karras", _SD, "stable-diffusion-v1-5",
                  "DPM++ 2M SDE Karras", SD15, 50, switch=_DPM_SDE_KARRAS),
    PipelineSetup("sd15-dpmpp-sde-karras", _SD, "stable-diffusion-v1-5",
                  "DPM++ SDE Karras", SD15, 50,
                  switch=("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
                  loop="brownian"),
    PipelineSetup("sd15-euler-a", _SD, "stable-diffusion-v1-5", "Euler a", SD15, 50,
                  switch=_EULER_A),
    PipelineSetup("sd15-euler", _SD, "stable-diffusion-v1-5", "Euler", SD15, 50,
                  switch=("EulerDiscreteScheduler", {})),
    PipelineSetup("sd15-heun", _SD, "stable-diffusion-v1-5", "Heun", SD15, 50,
                  switch=("HeunDiscreteScheduler", {})),
    PipelineSetup("sd15-lms", _SD, "stable-diffusion-v1-5", "LMS", SD15, 50,
                  switch=("LMSDiscreteScheduler", {})),
    PipelineSetup("sd15-ddim", _SD, "stable-diffusion-v1-5", "DDIM", SD15, 50,
                  switch=("DDIMScheduler", {}), step_kwargs={"eta": 0.0}),
    PipelineSetup("sd15-unipc", _SD, "stable-diffusion-v1-5", "UniPC", SD15, 50,
                  switch=("UniPCMultistepScheduler", {})),
    PipelineSetup("sd15-deis", _SD, "stable-diffusion-v1-5", "DEIS", SD15, 50,
                  switch=("DEISMultistepScheduler", {})),
    PipelineSetup("sd15-dpmpp2s", _SD, "stable-diffusion-v1-5", "DPM++ 2S (singlestep)",
                  SD15, 50, switch=("DPMSolverSinglestepScheduler", {})),
    PipelineSetup("sd15-lcm-lora", _SD, "stable-diffusion-v1-5 + lcm-lora-sdv1-5",
                  "LCM", SD15, 4, switch=("LCMScheduler", {})),
    PipelineSetup("sd15-tcd-lora", _SD, "stable-diffusion-v1-5 + TCD-SD15-LoRA",
                  "TCD (eta 0.3)", SD15, 4, switch=("TCDScheduler", {}),
                  step_kwargs={"eta": _TCD_ETA}),
    PipelineSetup("sd21-v-ddim", _SD, "stable-diffusion-2-1",
                  "DDIM v-prediction (shipped)", SD21, 50, step_kwargs={"eta": 0.0}),
    PipelineSetup("sdxl-euler", _XL, "stable-diffusion-xl-base-1.0", "Euler (shipped)",
                  SDXL, 50),
    PipelineSetup("sdxl-dpmpp2m-karras", _XL, "stable-diffusion-xl-base-1.0",
                  "DPM++ 2M Karras", SDXL, 50, switch=_KARRAS),
    PipelineSetup("sdxl-dpmpp2m-sde-karras", _XL, "stable-diffusion-xl-base-1.0",
                  "DPM++ 2M SDE Karras", SDXL, 50, switch=_DPM_SDE_KARRAS),
    PipelineSetup("sdxl-euler-a", _XL, "stable-diffusion-xl-base-1.0", "Euler a",
                  SDXL, 50, switch=_EULER_A),
    PipelineSetup("sdxl-turbo-1", _XL, "sdxl-turbo", "Euler a trailing (shipped)",
                  SDXL_TURBO, 1),
    PipelineSetup("sdxl-turbo-4", _XL, "sdxl-turbo", "Euler a trailing (shipped)",
                  SDXL_TURBO, 4),
    PipelineSetup("sdxl-turbo-4-linspace", _XL, "sdxl-turbo (older config)",
                  "Euler a linspace (first upload)", SDXL_TURBO_LINSPACE, 4),
    PipelineSetup("sdxl-lcm-lora", _XL, "stable-diffusion-xl-base-1.0 + lcm-lora-sdxl",
                  "LCM", SDXL, 4, switch=("LCMScheduler", {})),
    PipelineSetup("sdxl-tcd-lora", _XL, "stable-diffusion-xl-base-1.0 + TCD-SDXL-LoRA",
                  "TCD (eta 0.3)", SDXL, 4, switch=("TCDScheduler", {}),
                  step_kwargs={"eta": _TCD_ETA}),
    PipelineSetup("playground-v2.5", _XL, "playground-v2.5-1024px-aesthetic",
                  "EDM DPM++ 2M (shipped)", PLAYGROUND, 50),
    PipelineSetup("sd3-medium", "StableDiffusion3Pipeline",
                  "stable-diffusion-3-medium-diffusers",
                  "FlowMatchEuler shift 3 (shipped)", SD3, 28, init_sigma=False),
    PipelineSetup("flux-dev", "FluxPipeline", "FLUX.1-dev",
                  "FlowMatchEuler, dynamic shifting (shipped)", FLUX_DEV, 28,
                  set_timesteps=flux_timesteps, init_sigma=False),
    PipelineSetup("flux-schnell", "FluxPipeline", "FLUX.1-schnell",
                  "FlowMatchEuler, pipeline sigmas (shipped)", FLUX_SCHNELL, 4,
                  set_timesteps=flux_timesteps, init_sigma=False),
    PipelineSetup("pixart-alpha", "PixArtAlphaPipeline", "PixArt-XL-2-1024-MS",
                  "DPM++ 2M (shipped)", PIXART, 20),
    PipelineSetup("pixart-sigma", "PixArtSigmaPipeline", "PixArt-Sigma-XL-2-1024-MS",
                  "DPM++ 2M (shipped)", PIXART, 20),
    PipelineSetup("sana-1600m", "SanaPipeline", "Sana_1600M_1024px_diffusers",
                  "DPM++ 2M flow sigmas, shift 3 (shipped)", SANA, 20,
                  init_sigma=False),
    PipelineSetup("kandinsky-2.2", "KandinskyV22Pipeline", "kandinsky-2-2-decoder",
                  "DDPM learned_range (shipped)", KANDINSKY22, 100),
    PipelineSetup("wan2.1-t2v-1.3b", "WanPipeline", "Wan2.1-T2V-1.3B-Diffusers",
                  "UniPC flow sigmas, shift 3 (shipped)", WAN21, 50, init_sigma=False),
    PipelineSetup("hunyuanvideo", "HunyuanVideoPipeline", "HunyuanVideo",
                  "FlowMatchEuler shift 7, pipeline sigmas (shipped)", HUNYUAN, 50,
                  set_timesteps=hunyuan_timesteps, init_sigma=False),
    PipelineSetup("ltx-video", "LTXPipeline", "LTX-Video",
                  "FlowMatchEuler, mu + shift_terminal (shipped)", LTX, 50,
                  set_timesteps=ltx_timesteps, init_sigma=False),
    PipelineSetup("cogvideox-2b", "CogVideoXPipeline", "CogVideoX-2b",
                  "CogVideoX DDIM (shipped)", COGVIDEOX_2B, 50,
                  step_kwargs={"eta": 0.0}),
    PipelineSetup("cogvideox-5b-dpm", "CogVideoXPipeline", "CogVideoX-5b",
                  "CogVideoX DPM (the model card's switch)", COGVIDEOX_5B, 50,
                  switch=("CogVideoXDPMScheduler", {"timestep_spacing": "trailing"}),
                  step_kwargs={"eta": 0.0}, loop="cogvideox-dpm"),
)
