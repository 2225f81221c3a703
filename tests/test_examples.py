"""Every example runs in a tiny configuration and its loss decreases; the sharded
example agrees with a single device."""

import importlib
import json
import os
import subprocess
import sys

import jax
import pytest


EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.fixture(scope="module")
def examples():
    # optax is not written for strict dtype promotion (conftest turns it on to keep
    # adjoint_jax honest), so the examples run under JAX's standard rules.
    sys.path.insert(0, EXAMPLES)
    with jax.numpy_dtype_promotion("standard"):
        yield lambda name: importlib.import_module(name)
    sys.path.remove(EXAMPLES)


TINY = ["--quiet", "--steps", "4", "--batch", "4"]


def test_guide_latent(examples, tmp_path):
    # The continuous adjoint needs ~10 steps to point the right way (at N = 4 its
    # gradient increases this loss: see AdjointDEIS' docstring).
    r = examples("guide_latent").run(TINY + ["--steps", "10", "--iters", "4", "--out",
                                             str(tmp_path), "--adjoint", "AdjointDEIS()",
                                             "--sampler", "DPMSolver1()"])
    assert r["loss_final"] < r["loss_first"]
    assert os.path.exists(r["png"]) and os.path.exists(r["curve"])
    assert 0 <= r["success_after"] <= 1


@pytest.mark.parametrize("name", ["blend_digits", "scheduled_conditioning"])
def test_blend(examples, tmp_path, name):
    r = examples(name).run(TINY + ["--iters", "4", "--out", str(tmp_path), "--lr", "0.1"])
    assert r["loss_final"] < r["loss_first"]
    assert r["nfe_baseline"] == 4 and r["nfe_optimised"] > r["nfe_baseline"]
    assert 0 <= r["verified_optimised"] <= 4
    assert os.path.exists(r["png"])


def test_finetune_style(examples, tmp_path):
    r = examples("finetune_style").run(
        ["--quiet", "--steps", "3", "--batch", "2", "--iters", "4", "--out",
         str(tmp_path), "--adjoint", "ReversibleAdjoint()", "--sampler",
         "McCallumFoster(DPMSolver2())", "--subset", "head"])
    assert r["loss_final"] < r["loss_first"]
    mem = {row["strategy"]: row["temp_bytes"] for row in r["comparison"]}
    assert len(mem) == 3 and all(v > 0 for v in mem.values())


def test_bad_strategy_is_a_clear_error(examples):
    with pytest.raises(ValueError, match="unknown adjoint"):
        examples("guide_latent").run(TINY + ["--adjoint", "Nope()"])
    with pytest.raises(ValueError, match="requires a reversible sampler"):
        examples("guide_latent").run(TINY + ["--adjoint", "ReversibleAdjoint()"])


def test_sharded_guidance_matches_single_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=4")
    out = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "sharded_guidance.py"), "--quiet",
         "--json", "--steps", "4", "--batch", "8", "--iters", "3", "--out",
         str(tmp_path)],
        capture_output=True, text=True, env=env, check=True, cwd=EXAMPLES,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["devices"] == 4
    assert r["grad_sharding_is_input_sharding"] and r["latent_sharding_kept"]
    # The shipped network computes in float32: agreement to float32 round-off.
    assert r["grad_rel_diff_vs_single_device"] < 1e-5
    assert r["loss_final"] < r["loss_first"]
    assert r["step_compilations"] == 1
    assert os.path.exists(r["png"]) and os.path.exists(r["curve"])
    assert os.path.dirname(r["png"]) == str(tmp_path)


HELP_DESCRIPTIONS = {
    "blend_digits": "Digit blending, the seed papers' \"morph\" task",
    "scheduled_conditioning": "Digit blending with time-scheduled conditioning",
    "guide_latent": "Guided generation by latent optimisation",
    "finetune_style": "Weight fine-tuning through the sampler",
    "reward_finetune": "Reward fine-tuning of the digits model's FiLM layers",
    "noise_optimisation": "Direct noise optimisation (DNO, Tang et al. 2025)",
    "implicit_adjoint_matching": "Reward fine-tuning of the digits model's FiLM layers "
                                 "three ways",
    "train_digits": "Trains the model zoo's digits models",
}


@pytest.mark.parametrize("name", sorted(HELP_DESCRIPTIONS))
def test_help_is_complete_with_defaults(examples, name, capsys):
    mod = examples(name)
    entry = mod.parse_args if name == "train_digits" else mod.run
    with pytest.raises(SystemExit):
        entry(["--help"])
    _check_help(capsys.readouterr().out, HELP_DESCRIPTIONS[name])


def test_help_of_sharded_guidance():
    # In a subprocess: the script sets XLA_FLAGS when imported.
    out = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "sharded_guidance.py"), "--help"],
        capture_output=True, text=True, check=True, cwd=EXAMPLES,
    ).stdout
    _check_help(out, "Latent guidance with the batch sharded across devices")


def _check_help(out: str, start: str):
    usage, rest = out.split("\n\n", 1)
    description, options = rest.split("\n\noptions:\n", 1)
    description = " ".join(description.split())
    # The first paragraph of the docstring, whole: a sentence that ends.
    assert description.startswith(start), description
    assert description.endswith("."), description
    # Every option but -h documents itself and shows its default.
    blocks = [b for b in options.replace("\n  -", "\n\x00-").split("\x00")[1:]
              if not b.startswith("-h")]
    assert blocks
    for block in blocks:
        assert "(default:" in block, block


def test_reward_finetune(examples, tmp_path):
    # One estimator (AlignProp's randomised truncation), tiny: every output written,
    # the reward rises (the loss, minus the held-out reward, falls).
    r = examples("reward_finetune").run(
        ["--quiet", "--steps", "4", "--batch", "4", "--budget", "40", "--lr", "3e-3",
         "--only", "AlignProp", "--out", str(tmp_path)])
    assert [row["estimator"][:16] for row in r["rows"]] == ["Truncated(last=("]
    for row in r["rows"]:
        assert r["loss_final"][row["estimator"]] < r["loss_first"]
        assert row["steps"] == 40 // row["nfe_per_step"] and row["temp_mib"] > 0
    assert os.path.exists(r["table"]) and os.path.exists(r["plot"])


def test_implicit_adjoint_matching(examples, tmp_path):
    # The two new methods (DTO's path is the other examples'), tiny (N = 3): every
    # output written, each method spends at most the budget (Implicit Diffusion's
    # warm-up included), the evaluation counts are the documented ones, and the
    # reward rises.
    r = examples("implicit_adjoint_matching").run(
        ["--quiet", "--steps", "3", "--batch", "4", "--budget", "120", "--lr", "3e-3",
         "--num-times", "2", "--only", "ImplicitDiffusion,adjoint_matching", "--out",
         str(tmp_path)])
    rows = {row["method"]: row for row in r["rows"]}
    assert list(rows) == ["ImplicitDiffusion", "adjoint_matching_loss"]
    # Per step, in evaluations of one batch: Implicit Diffusion one sampling call
    # and one VJP (with its forward) over N slots, 3N, after a warm-up of
    # (2N − 2) N + (N − 1) 2N; Adjoint Matching N (sampling) + 2N (lean adjoint)
    # + 3K (both models at K times, the fine-tuned one's VJP).
    assert rows["ImplicitDiffusion"]["evals_per_step"] == 9
    assert rows["ImplicitDiffusion"]["warm_up_evals"] == 4 * 3 * 2
    assert rows["adjoint_matching_loss"]["evals_per_step"] == 9 + 6
    for row in rows.values():
        assert row["evals"] <= 120 and row["steps"] >= 1
        assert 0 <= row["accuracy"] <= 1 and row["diversity"] > 0
    assert max(row["reward"] for row in rows.values()) > r["reward_before"]
    assert os.path.exists(r["table"]) and os.path.exists(r["plot"])


def test_noise_optimisation(examples, tmp_path):
    r = examples("noise_optimisation").run(
        ["--quiet", "--steps", "3", "--batch", "2", "--iters", "4", "--out",
         str(tmp_path), "--only", "x_T,x_T + noises + regulariser"])
    assert [row["run"] for row in r["rows"]] == ["x_T", "x_T + noises + regulariser"]
    for row in r["rows"]:
        assert row["loss_final"] < row["loss_first"], row
    assert os.path.exists(r["table"]) and os.path.exists(r["png"])
