"""The pipeline table (`benchmarks/pipelines.py`) on representative set-ups: the real
diffusers scheduler loop of a public pipeline (its shipped `scheduler_config.json`
or the switch users make, its default step count, what it passes to
`set_timesteps`) in float64 against `aj.from_diffusers` + `aj.sample` on the same
analytic network, noises and z, to 1e-10. `python benchmarks/pipelines.py` runs all
of them; the set-ups here cover SD 1.5's shipped PNDM, Euler ancestral with trailing
spacing (stochastic), DPM-Solver++ SDE on Karras σ (stochastic), Playground's EDM
DPM-Solver++, UniPC on flow σ, TCD (stochastic), and flow matching with
pipeline-passed σ and μ."""

import importlib.util
import json
import os

import pytest


pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning",
    "ignore:The config attributes:FutureWarning",
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REPRESENTATIVE = (
    "sd15-pndm",                 # SD 1.5's shipped PNDM (PLMS), 50 steps
    "sdxl-turbo-4",              # EulerAncestral, trailing, 4 steps, same noises
    "sdxl-dpmpp2m-sde-karras",   # sde-dpmsolver++ on Karras σ, same noises
    "playground-v2.5",           # EDM DPM-Solver++ 2M on Karras σ, 50 steps
    "wan2.1-t2v-1.3b",           # UniPC, flow σ with shift 3, 50 steps
    "sdxl-tcd-lora",             # TCD, eta 0.3, same noises
    "flux-dev",                  # FlowMatchEuler, σ = linspace(1, 1/n, n) and μ
)


@pytest.fixture(scope="module")
def pipelines():
    spec = importlib.util.spec_from_file_location(
        "pipelines_bench", os.path.join(ROOT, "benchmarks", "pipelines.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def by_key(pipelines):
    return {s.key: s for s in pipelines.SETUPS}


@pytest.mark.parametrize("key", REPRESENTATIVE)
def test_pipeline_setup_reproduced(pipelines, by_key, key):
    row = pipelines.run_setup(by_key[key])
    assert row["status"] == "reproduced", row
    assert row["diff"] <= 1e-10
    # aj ran the pipeline's steps (PNDM's loop repeats one timestep: N + 1 calls).
    assert row["aj_steps"] == row["N"], row
    assert row["diffusers_timesteps"] == row["N"] + (key == "sd15-pndm"), row
    # The stochastic ones ran on the scheduler's own draws: Euler ancestral and
    # sde-dpmsolver++ one per step, TCD one per step but the last.
    draws = {"sdxl-turbo-4": 4, "sdxl-dpmpp2m-sde-karras": 50, "sdxl-tcd-lora": 3}
    assert row["draws"] == draws.get(key, 0), row


def test_a_refusal_is_reported_with_its_message(pipelines, by_key, tmp_path, capsys):
    # Kandinsky 2.2's DDPM reads the variance its UNet predicts (learned_range).
    rc = pipelines.main(["--only", "kandinsky-2.2", "--json",
                         str(tmp_path / "rows.json")])
    assert rc == 0
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["status"] == "refused" and "variance_type" in row["message"], row
    assert row["diffusers_finite"], row  # diffusers itself still ran it
    table = capsys.readouterr().out
    assert "| KandinskyV22Pipeline" in table and "refused: " in table


def test_the_configs_are_complete(pipelines):
    keys = [s.key for s in pipelines.SETUPS]
    assert len(keys) == len(set(keys)) >= 31
    for s in pipelines.SETUPS:
        assert s.config["_class_name"] and s.steps >= 1, s
