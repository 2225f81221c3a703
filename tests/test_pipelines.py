"""The pipeline table (`benchmarks/pipelines.py`) on representative set-ups: the real
diffusers scheduler loop of a public pipeline (its shipped `scheduler_config.json`
or the switch users make, its default step count, what it passes to
`set_timesteps`) in float64 against `aj.from_diffusers` + `aj.sample` on the same
analytic network, noises and z, to 1e-10. `python benchmarks/pipelines.py` runs all
of them; the set-ups here cover SD 1.5's shipped PNDM, Euler ancestral with trailing
spacing (stochastic), DPM-Solver++ SDE on Karras σ (stochastic), Playground's EDM
DPM-Solver++, UniPC on flow σ, TCD (stochastic), and flow matching with
pipeline-passed σ and μ.

The option table (`--table options`): every scheduler class of `aj.from_diffusers`'
registry has rows (checked without running them), and a few rows run here: Euler's
step churn in a σ window (a `step` argument, its normals on the churning steps
only), UniPC bh1
(diffusers NaN, ours finite), DPM-Solver with a σ = 0 end (diffusers raises) and the
files `--docs` writes."""

import importlib.util
import json
import os

import pytest


pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning",
    "ignore:The config attributes:FutureWarning",
    "ignore:`algorithm_types:FutureWarning",
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
    (row,) = json.loads((tmp_path / "rows.json").read_text(encoding="utf-8"))
    assert row["status"] == "refused" and "variance_type" in row["message"], row
    assert row["diffusers_finite"], row  # diffusers itself still ran it
    table = capsys.readouterr().out
    assert "| KandinskyV22Pipeline" in table and "refused: " in table


def test_the_configs_are_complete(pipelines):
    keys = [s.key for s in pipelines.SETUPS]
    assert len(keys) == len(set(keys)) >= 31
    for s in pipelines.SETUPS:
        assert s.config["_class_name"] and s.steps >= 1, s


# ---- the option table ----------------------------------------------------------------

def test_every_registered_scheduler_class_has_option_rows(pipelines):
    """A class added to `aj.from_diffusers`' registry without a row in the option
    table (`benchmarks/option_configs*.py`) fails here."""
    from adjoint_jax._diffusers._setup import _BY_NAME

    classes = {o.cls for o in pipelines.OPTIONS}
    assert not sorted(set(_BY_NAME) - classes), "no option row for these classes"
    assert not sorted(classes - set(_BY_NAME)), "rows for classes aj does not have"
    keys = pipelines.option_keys(pipelines.OPTIONS)
    assert len(keys) == len(set(keys)) == len(pipelines.OPTIONS)
    for o in pipelines.OPTIONS:
        pipelines.float64_class(o.cls)  # diffusers' class in float64 exists
        assert o.steps and min(o.steps) < 15, o  # each row has a short run
    for name in _BY_NAME:  # and each class a row at two step counts
        assert any(len(o.steps) == 2 for o in pipelines.OPTIONS if o.cls == name), name


def _option(pipelines, cls, pred):
    for key, o in zip(pipelines.option_keys(pipelines.OPTIONS), pipelines.OPTIONS):
        if o.cls == cls and pred(o):
            return key, o
    raise LookupError(cls)


def test_option_rows_churn_nan_and_diffusers_refusal(pipelines):
    key, o = _option(pipelines, "EulerDiscreteScheduler",
                     lambda o: o.step_kwargs.get("s_tmax") == 5.0)
    row = pipelines.run_option(key, o, 7)
    assert row["status"] == "reproduced" and row["sampler"].startswith(
        "EulerChurn(s_churn=3.0"), row
    assert 0 < row["draws"] < 7, row  # a normal on each churning step (σ in [0.5, 5])
    key, o = _option(pipelines, "UniPCMultistepScheduler",
                     lambda o: o.config == {"solver_type": "bh1"})
    row = pipelines.run_option(key, o, 9)
    assert row["status"] == "diffusers non-finite" and row["diff"] is None, row
    key, o = _option(pipelines, "DPMSolverMultistepScheduler",
                     lambda o: o.config.get("algorithm_type") == "dpmsolver"
                     and "final_sigmas_type" not in o.config)
    row = pipelines.run_option(key, o, 8)
    assert row["status"] == "diffusers raises", row
    assert row["aj_accepts"] == "DPMSolver()" and "final_sigmas_type" in row["message"]


def test_docs_mode_writes_markdown_and_json_with_the_header(pipelines, tmp_path):
    key, _ = _option(pipelines, "DDIMScheduler", lambda o: o.config == {})
    rc = pipelines.main(["--table", "options", "--only", key, "--steps", "4",
                         "--docs", str(tmp_path)])
    assert rc == 0
    text = (tmp_path / "options.md").read_text(encoding="utf-8")
    head = text.splitlines()[2]
    assert "--only " + key in head and "no GPU" in head and "diffusers 0.42" in head
    assert "| DDIMScheduler | defaults" in text and "reproduced (≤ 1e-10)" in text
    data = json.loads((tmp_path / "options.json").read_text(encoding="utf-8"))
    assert data["meta"]["versions"]["jax"] and len(data["rows"]) == 1
    assert data["rows"][0]["status"] == "reproduced" and data["rows"][0]["N"] == 4
