"""The option table of `benchmarks/pipelines.py --table options`: one row per diffusers
scheduler class `aj.from_diffusers` supports × each option value that changes the
numbers (σ/timestep grids and spacings, shifts and μ, pipeline-passed `sigmas` /
`timesteps`, solver orders and types, algorithm types, lower_order_final,
euler_at_final, corrector options, prediction types, clip_sample / thresholding,
variance types, and the `step` arguments η / γ / churn / order), each at two step
counts (one below 15), and the options `aj` refuses (a row with its message).

This file has the `Option` row, its helpers and the schedulers on DDPM's integer
timesteps (DDIM, DDPM, CogVideoX DDIM and DPM, DPM-Solver multistep and singlestep,
DEIS, DPM++ SDE, UniPC, PNDM, LCM, TCD); `option_configs_sigma.py` the k-diffusion,
flow matching and EDM ones (`pipelines.OPTIONS` is both). The cases follow the float64
parity tests (`tests/test_diffusers_*.py`), which pin the same options case by
case; `tests/test_pipelines.py` checks that every class of the registry
(`adjoint_jax._diffusers._setup._BY_NAME`) has a row.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pipeline_report import call_text


@dataclass(frozen=True)
class Option:
    """One option row (run at each of `steps`).

    - `cls`: the diffusers class name; `config`: the keys set beyond the class's
        defaults (`Cls(**config)`, as `from_config` of a shipped file with them).
    - `set_timesteps(config, n)`: what is passed to `set_timesteps` for step count n
        (default `num_inference_steps=n`); `step_kwargs`: extra `step` arguments.
    - `sampler(setup, n)`: the `aj` sampler of a `step` argument that
        `aj.from_diffusers` does not take (churn, LMS order, clipped ε), replacing
        the setup's; `loop`: as for a pipeline set-up ("brownian": DPM++ SDE).
    - `note`: why the row is there (shown after the options).
    """

    cls: str
    config: dict[str, Any] = field(default_factory=dict)
    steps: tuple[int, ...] = (8, 20)
    set_timesteps: Callable[[dict, int], dict] | None = None
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    sampler: Callable | None = None
    loop: str = "standard"
    note: str = ""


SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
COS = dict(beta_schedule="squaredcos_cap_v2")
FLOWP = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
V, X0, FP = (dict(prediction_type=p) for p in ("v_prediction", "sample",
                                                "flow_prediction"))
TH = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.3)
ZSNR = dict(rescale_betas_zero_snr=True)
SMIN = dict(final_sigmas_type="sigma_min")


def mu(value, sigmas=None):
    """`set_timesteps(n, mu=value)` (and σ = linspace(1, 1/n, n), FLUX's)."""
    def f(config, n):
        extra = {"sigmas": np.linspace(1.0, 1 / n, n)} if sigmas == "flux" else {}
        return {"num_inference_steps": n, "mu": value, **extra}
    return f


def given(name, *lists, drop=0, tensor=False):
    """`set_timesteps(name=list)`: for n steps the list of length n + drop (`steps` =
    `lens(*lists, drop=drop)`)."""
    table = {len(v) - drop: np.asarray(v, np.float64) for v in lists}
    return lambda config, n: {
        name: torch.as_tensor(table[n]) if tensor else table[n]}


def by_n(name, make):
    """`set_timesteps(name=make(n))`."""
    return lambda config, n: {name: np.asarray(make(n), np.float64)}


def lens(*lists, drop=0):
    return tuple(len(v) - drop for v in lists)


def clipped_eps(setup, n):
    """DDIM's `step(use_clipped_model_output=True)`: ε from the clipped x̂_0."""
    return dataclasses.replace(setup.sampler, clipped_eps=True)


DDPM_T = ([900, 700, 500, 301, 100, 0], [999, 640, 400, 123, 7, 2, 0])
DDPM_T_NOISE = ([999, 750, 400, 120, 37], [850, 500, 250, 100, 50, 0])
DPM_T = ([999, 850, 700, 520, 300, 160, 60, 10],
         [999, 900, 800, 650, 500, 420, 300, 250, 200, 150, 120, 90, 70, 50, 40, 30, 20,
          10, 5, 0])
SINGLE_T = ([999, 850, 700, 600, 500, 300, 200, 100, 40, 10], [951, 700, 420, 180, 31])
LCM_T = ([999, 759, 499, 259], [999, 899, 799, 699, 599, 499, 399, 299, 199, 99, 50, 19,
                                0])
TCD_T = ([999, 700, 360, 90], [999, 800, 720, 700, 500, 360, 200, 90, 0])


def rows(cls, *entries, steps=(8, 20)):
    """`Option(cls, *entry)` for each tuple entry (config, steps, set_timesteps,
    step_kwargs, sampler; `steps` if the entry has none; a last str is the note)."""
    out = []
    for e in entries:
        note = e[-1] if isinstance(e[-1], str) else ""
        e = e[:-1] if note else e
        out.append(Option(cls, *(e if len(e) > 1 else (*e, steps)), note=note))
    return tuple(out)


DDIM, DDPM, COG = "DDIMScheduler", "DDPMScheduler", "CogVideoXDDIMScheduler"
COG_DPM = "CogVideoXDPMScheduler"
DPM, SINGLE = "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"
DEIS, SDE = "DEISMultistepScheduler", "DPMSolverSDEScheduler"
UNIPC, PNDM = "UniPCMultistepScheduler", "PNDMScheduler"
EULER, EULER_A = "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"
HEUN, FHEUN = "HeunDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"
KDPM2, KDPM2A, LMS = ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                      "LMSDiscreteScheduler")
FLOW, LCM, TCD = "FlowMatchEulerDiscreteScheduler", "LCMScheduler", "TCDScheduler"
EDMDPM, EDMEULER = "EDMDPMSolverMultistepScheduler", "EDMEulerScheduler"
NC = dict(clip_sample=False)
COG_5B = V | ZSNR | NC | dict(timestep_spacing="trailing", snr_shift_scale=1.0)

TIMESTEP_ROWS: tuple[Option, ...] = (
    # ---- DDIM ------------------------------------------------------------------------
    *rows(
        DDIM,
        ({}, (10, 50), "diffusers' defaults: clip_sample"),
        (NC,), (dict(clip_sample_range=1.2),), (SD | NC,), (COS | NC,),
        (dict(NC, timestep_spacing="trailing"), (7, 30)),
        (dict(NC, timestep_spacing="linspace"),), (dict(NC, steps_offset=1),),
        (dict(NC, set_alpha_to_one=False),), (dict(set_alpha_to_one=False),),
        (NC | V,), (NC | X0,),
        (TH | X0 | dict(set_alpha_to_one=False, steps_offset=1),),
        (SD | NC | V | ZSNR | dict(timestep_spacing="trailing"),),
        (NC, (8, 20), None, {"eta": 0.5}), (NC, (8, 20), None, {"eta": 1.0}),
        (SD | NC | V | ZSNR | dict(timestep_spacing="trailing"), (10, 20), None,
         {"eta": 0.8, "use_clipped_model_output": True}, clipped_eps),
        (NC, (3, 12), given("timesteps", [999, 500, 0], list(range(999, 0, -84)))),
    ),
    # ---- DDPM ------------------------------------------------------------------------
    *rows(
        DDPM,
        ({}, (10, 30), "diffusers' defaults: clip_sample"),
        (NC,), (SD | NC,), (COS | NC,),
        *((dict(NC, variance_type=v),) for v in ("fixed_small_log", "fixed_large",
                                                 "fixed_large_log", "learned",
                                                 "learned_range")),
        (dict(NC, timestep_spacing="trailing"), (7, 20)),
        (dict(NC, timestep_spacing="linspace"), (9, 20)),
        (dict(NC, timestep_spacing="leading", steps_offset=1),),
        (TH | V | dict(variance_type="fixed_large", timestep_spacing="trailing"),
         (7, 20)),
        (NC | V,), (dict(X0, clip_sample_range=1.5),),
        (NC, lens(*DDPM_T), given("timesteps", *DDPM_T)),
        (dict(variance_type="fixed_large"), lens(*DDPM_T_NOISE),
         given("timesteps", *DDPM_T_NOISE)),
    ),
    # ---- CogVideoX DDIM -----------------------------------------------------------
    *rows(
        COG,
        ({}, (7, 20)),
        ({}, (7, 20), None, {"eta": 0.7}, "η: ignored by its step"),
        (V | ZSNR | NC | dict(timestep_spacing="trailing", snr_shift_scale=3.0),
         (9, 50), "CogVideoX-2b"),
        (V | dict(snr_shift_scale=1.0, steps_offset=1, set_alpha_to_one=False),),
        (dict(timestep_spacing="linspace"), (7, 20)),
        ({}, (2, 3), given("timesteps", [999, 0], [999, 500, 0])),
    ),
    # ---- CogVideoX DPM (the pipeline's loop: step(out, old_x0, t, t_prev, latents)) --
    *(Option(COG_DPM, c, s, step_kwargs={"eta": 0.0}, loop="cogvideox-dpm", note=t)
      for c, s, t in (
        (COG_5B, (7, 50), "CogVideoX-5b with the model card's switch"),
        (COG_5B | dict(snr_shift_scale=3.0), (10, 25), ""), ({}, (7, 20), ""),
        (X0 | dict(set_alpha_to_one=False, steps_offset=1), (8, 20), ""),
        (dict(set_alpha_to_one=False, rescale_betas_zero_snr=True), (7, 12), ""),
        (V | COS | dict(timestep_spacing="linspace", snr_shift_scale=2.0), (6, 30), ""),
        (V | dict(beta_schedule="linear", num_train_timesteps=500,
                  timestep_spacing="trailing", set_alpha_to_one=False), (9, 16), ""),
        (dict(snr_shift_scale=0.0), (3, 10), ""),
        (ZSNR | dict(timestep_spacing="trailing"), (3, 10), ""),
        (dict(set_alpha_to_one=False), (1,), ""),
    )),
    Option(COG_DPM, {}, (2,), given("timesteps", [999, 0]), {"eta": 0.0},
           loop="cogvideox-dpm"),
    # ---- DPMSolverMultistep ----------------------------------------------------------
    *rows(
        DPM,
        ({},), (SD,), (COS,), (SD | dict(timestep_spacing="leading", steps_offset=1),),
        (SD | dict(timestep_spacing="trailing"),),
        *((SD | {k: True},) for k in ("use_karras_sigmas", "use_exponential_sigmas",
                                      "use_beta_sigmas", "use_lu_lambdas")),
        (FLOWP,), (FLOWP | dict(flow_shift=3.0),),
        (FLOWP | dict(use_dynamic_shifting=True), (8, 20), mu(0.8)),
        (dict(FLOWP, use_dynamic_shifting=True, time_shift_type="linear"), (8, 20),
         mu(0.5)),
        (SD | SMIN,), (SD | dict(use_karras_sigmas=True) | SMIN,),
        (dict(use_exponential_sigmas=True) | SMIN,),
        (SD | dict(solver_order=1),), (SD | dict(solver_order=3),),
        (SD | dict(solver_type="heun"),),
        (SD | dict(lower_order_final=False),),
        (SD | dict(solver_order=3, lower_order_final=False) | SMIN,),
        (COS | dict(use_karras_sigmas=True, euler_at_final=True) | SMIN,),
        (SD | dict(euler_at_final=True),),
        *((SD | dict(algorithm_type="sde-dpmsolver++", solver_order=k),)
          for k in (1, 2, 3)),
        (SD | dict(algorithm_type="sde-dpmsolver++", solver_order=3,
                   use_karras_sigmas=True),),
        (SD | dict(algorithm_type="sde-dpmsolver++", solver_type="heun") | TH,),
        (SD | dict(algorithm_type="dpmsolver") | SMIN,),
        (SD | dict(algorithm_type="dpmsolver"),),
        (SD | dict(algorithm_type="dpmsolver", solver_order=3) | V | SMIN,),
        (SD | dict(algorithm_type="dpmsolver", solver_type="heun") | TH | SMIN,),
        (SD | dict(algorithm_type="sde-dpmsolver") | SMIN,),
        (SD | dict(algorithm_type="sde-dpmsolver"),),
        (SD | dict(algorithm_type="sde-dpmsolver", solver_type="heun",
                   use_beta_sigmas=True, euler_at_final=True) | SMIN,),
        (SD | dict(algorithm_type="deis") | SMIN,),
        (SD | TH,), (SD | V,), (SD | X0,), (SD | FP,),
        (dict(use_flow_sigmas=True, flow_shift=3.0),),
        (dict(use_flow_sigmas=True, flow_shift=3.0, algorithm_type="dpmsolver") | V
         | SMIN,),
        (FLOWP | dict(flow_shift=12.0, algorithm_type="sde-dpmsolver++"),),
        (COS | dict(lambda_min_clipped=-5.1, timestep_spacing="trailing"),),
        (SD | V | ZSNR | dict(timestep_spacing="trailing"),), (ZSNR,),
        (dict(variance_type="learned"),), (dict(solver_order=4),),
        (SD, lens(*DPM_T), given("timesteps", *DPM_T)),
        (SD | dict(use_karras_sigmas=True), (3,), given("timesteps", [999, 500, 10])),
        (SD, (3,), given("sigmas", [14.6, 1.0, 0.1])),
    ),
    # ---- DPMSolverSinglestep ---------------------------------------------------------
    *rows(
        SINGLE,
        ({}, (9, 20)), (SD, (9, 20)),
        (SD | dict(solver_order=1), (7, 20)), (SD | dict(solver_order=3), (9, 16)),
        (SD | dict(solver_type="heun"), (9, 20)),
        (SD | dict(solver_order=3, lower_order_final=False) | SMIN, (9, 12)),
        (SD | dict(solver_order=3, use_karras_sigmas=True) | V, (9, 16)),
        (SD | dict(solver_order=3, solver_type="heun", use_exponential_sigmas=True,
                   lower_order_final=False) | X0 | SMIN, (9, 12)),
        (SD | dict(algorithm_type="dpmsolver", solver_type="heun", use_beta_sigmas=True,
                   lower_order_final=False) | SMIN, (7, 18)),
        (SD | dict(algorithm_type="dpmsolver", solver_order=3) | V | SMIN, (10, 21)),
        (SD | dict(algorithm_type="dpmsolver"), (9, 20)),
        (SD | dict(algorithm_type="sde-dpmsolver++", solver_order=3), (10, 17)),
        (SD | dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun",
                   use_karras_sigmas=True), (9, 14)),
        (SD | dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True) | V | TH,
         (8, 15)),
        (SD | dict(solver_order=3) | TH, (9, 16)),
        (COS | dict(lambda_min_clipped=-5.1, solver_order=1,
                    variance_type="learned_range"), (6, 15)),
        (FLOWP | dict(flow_shift=3.0, solver_order=3), (10, 16)),
        (dict(use_flow_sigmas=True, algorithm_type="dpmsolver") | V | SMIN, (6, 12)),
        (dict(use_flow_sigmas=True, use_dynamic_shifting=True, lower_order_final=False)
         | SMIN, (8, 12), mu(0.8)),
        (SD | FP, (8, 15)), (SD | dict(use_karras_sigmas=True, use_beta_sigmas=True),),
        (dict(variance_type="learned") | X0,),
        (SD | dict(solver_order=3, solver_type="heun"), lens(*SINGLE_T),
         given("timesteps", *SINGLE_T)),
        (SD, (2,), given("sigmas", [14.0, 1.0])),
    ),
    # ---- DEIS ------------------------------------------------------------------------
    *rows(
        DEIS,
        ({}, (10, 20)),
        (SD | dict(solver_order=1, use_exponential_sigmas=True), (5, 15)),
        (SD | dict(solver_order=3), (9, 25)),
        (SD | dict(solver_order=3, timestep_spacing="leading", steps_offset=1),
         (9, 25)),
        (SD | dict(solver_order=3, timestep_spacing="trailing", lower_order_final=False)
         | X0, (7, 12)),
        (SD | dict(solver_order=3, use_karras_sigmas=True) | V, (8, 16)),
        (SD | dict(solver_order=3, use_beta_sigmas=True), (6, 15)),
        (SD | dict(solver_order=3, use_exponential_sigmas=True) | TH, (8, 16)),
        (dict(use_flow_sigmas=True, flow_shift=2.0) | V, (6, 12)),
        (FLOWP | dict(use_dynamic_shifting=True, solver_order=3), (10, 18), mu(1.1)),
        (SD | FP | dict(use_karras_sigmas=True), (7, 13)),
        (dict(algorithm_type="sde-dpmsolver++"),), (dict(solver_type="bh3"),),
        ({}, (3,), given("timesteps", [900, 500, 100])),
    ),
    # ---- DPM++ SDE (Brownian increments fed as the same normals) ---------------------
    *(Option(SDE, c, s, loop="brownian") for c, s in (
        (SD, (7, 16)), (SD | V | dict(use_karras_sigmas=True), (6, 12)),
        (SD | dict(timestep_spacing="leading", steps_offset=1,
                   use_exponential_sigmas=True), (5, 10)),
        (dict(timestep_spacing="trailing", use_beta_sigmas=True), (6, 11)),
        (X0, (6, 11)),
    )),
    Option(SDE, {}, (6, 11), step_kwargs={"eta": 0.5}, loop="brownian"),
    # ---- UniPC -----------------------------------------------------------------------
    *rows(
        UNIPC,
        ({}, (8, 25)), (SD,), (dict(solver_type="bh1"), (9, 20)),
        (dict(predict_x0=False, solver_order=3), (9, 20)),
        (SD | dict(predict_x0=False, solver_type="bh1", solver_order=3,
                   timestep_spacing="trailing", lower_order_final=False) | SMIN,
         (6, 20)),
        (COS | X0 | dict(solver_order=1, timestep_spacing="leading", steps_offset=1),
         (7, 20)),
        (SD | V | dict(solver_type="bh1", disable_corrector=[0, 2]) | SMIN, (7, 16)),
        (SD | dict(predict_x0=False, use_karras_sigmas=True, sigma_min=0.1,
                   sigma_max=10.0) | SMIN, (6, 20)),
        (dict(use_exponential_sigmas=True, solver_order=3) | TH, (7, 20)),
        (SD | FP | dict(use_beta_sigmas=True, lower_order_final=False) | SMIN, (7, 20)),
        (SD | V | ZSNR | dict(use_karras_sigmas=True),),
        (FLOWP | dict(flow_shift=3.0), (10, 30), "Wan 2.1"),
        (FLOWP | dict(use_dynamic_shifting=True, solver_order=3, solver_type="bh1")
         | SMIN,
         (7, 20), mu(0.9)),
        (dict(use_flow_sigmas=True, use_karras_sigmas=True), (7, 20)),
        (dict(use_flow_sigmas=True, use_dynamic_shifting=True, time_shift_type="linear",
              shift_terminal=0.1) | V, (7, 20), mu(1.7)),
        (dict(use_flow_sigmas=True, flow_shift=2.0) | X0, (6, 17),
         by_n("sigmas", lambda n: np.linspace(1.0, 0.05, n))),
        (dict(solver_p="DPMSolverMultistepScheduler"),), (ZSNR,),
        (dict(lower_order_final=False), (10, 20)),
        (dict(FLOWP, flow_shift=12.0), (10, 100)),
        ({}, (3,), given("timesteps", [999, 500, 1])),
    ),
    # ---- PNDM ------------------------------------------------------------------------
    *rows(
        PNDM,
        ({}, (6, 20), "F-PNDM (Runge–Kutta warm-up)"),
        (V | COS | dict(steps_offset=1, set_alpha_to_one=True), (4, 16)),
        (SD | dict(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
         (8, 25), "PLMS (Stable Diffusion 1.x)"),
        (V | dict(skip_prk_steps=True, set_alpha_to_one=True,
                  timestep_spacing="trailing"), (10, 20)),
        (dict(skip_prk_steps=True, steps_offset=1), (1, 2)),
        (dict(skip_prk_steps=True), (1,)),
        (dict(skip_prk_steps=True, timestep_spacing="linspace"), (10, 20)),
        (X0, (6, 20)), ({}, (3, 9)),
    ),
    # ---- LCM / TCD (γ = the step's eta) ----------------------------------------------
    *rows(
        LCM,
        ({}, (4, 20)),
        (V | dict(timestep_scaling=5.0, original_inference_steps=25), (4, 20)),
        (X0 | dict(clip_sample=True, clip_sample_range=0.8), (4, 20)),
        (dict(TH), (4, 20)), (ZSNR | V, (4, 20)),
        (dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02), (4, 20)),
        ({}, lens(*LCM_T), given("timesteps", *LCM_T)),
    ),
    *(Option(TCD, c, (4, 20), *rest) for c, *rest in (
        ({}, None, {"eta": 0.3}), ({}, None, {"eta": 0.0}), ({}, None, {"eta": 1.0}),
        (V, None, {"eta": 0.7}),
        (X0 | dict(original_inference_steps=40), None, {"eta": 0.5}),
        (ZSNR | V, None, {"eta": 0.3}),
    )),
    Option(TCD, {}, lens(*TCD_T), given("timesteps", *TCD_T), {"eta": 0.3}),
)


def option_keys(options) -> list[str]:
    """One key per entry of `options`: the class name and its row number in the
    class (`DDIMScheduler:3`)."""
    keys, seen = [], {}
    for o in options:
        seen[o.cls] = seen.get(o.cls, 0) + 1
        keys.append(f"{o.cls}:{seen[o.cls]}")
    return keys


def options_text(option: Option, n: int) -> str:
    """The row's options as a user writes them (config keys, then the
    `set_timesteps` and `step` arguments)."""
    cfg = dict(option.config)
    parts = []
    if all(cfg.get(k) == v for k, v in SD.items()):
        parts.append("SD betas (scaled_linear 0.00085–0.012)")
        cfg = {k: v for k, v in cfg.items() if k not in SD}
    parts += [f"{k}={v!r}" for k, v in cfg.items()]
    if option.set_timesteps is not None:
        parts.append(call_text(option.set_timesteps(option.config, n)))
    if option.step_kwargs:
        parts.append("step(" + ", ".join(f"{k}={v!r}" for k, v in
                                          option.step_kwargs.items()) + ")")
    text = ", ".join(parts) or "defaults"
    return f"{text} — {option.note}" if option.note else text
