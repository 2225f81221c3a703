"""examples/sharded_finetune.py: LoRA reward fine-tuning over a 2 × 2 (data × model)
mesh of 4 simulated CPU devices, interrupted after 3 steps and resumed from its Orbax
checkpoint, ends where an uninterrupted run ends (and, resumed on a 4 × 1 mesh, ends
there to float32 round-off); and its `--help`.

The example runs in a subprocess: the device count is fixed when JAX starts, and the
pytest process keeps its one device. The subprocess inherits this process's
environment (conftest's XLA flags and persistent compilation cache)."""

import json
import os
import subprocess
import sys


EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")

# Four runs in one process (JAX starts once): 3 steps on 2 × 2, saving checkpoints
# at steps 2 and 3; that run resumed up to 5 steps; the same from a copy of the
# checkpoints on a 4 × 1 mesh; and an uninterrupted 5-step run on 2 × 2.
DRIVER = r"""
import json, shutil, sys
import numpy as np
import jax
import sharded_finetune as ft

tiny, ckpt = json.loads(sys.argv[1]), sys.argv[2]
m22, m41 = ["--data", "2", "--model", "2"], ["--data", "4", "--model", "1"]
first = ft.run(tiny + m22 + ["--iters", "3", "--ckpt-dir", ckpt, "--ckpt-every", "2"])
shutil.copytree(ckpt, ckpt + "_copy")
resumed = ft.run(tiny + m22 + ["--iters", "5", "--ckpt-dir", ckpt, "--resume"])
other = ft.run(tiny + m41 + ["--iters", "5", "--ckpt-dir", ckpt + "_copy", "--resume"])
whole = ft.run(tiny + m22 + ["--iters", "5"])

def flat(tree):
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])

w = flat(whole["lora"])
keep = ("devices", "mesh", "start_step", "resumed_from", "end_step", "losses",
        "checkpoint_step", "reward_start", "reward_end", "memory_per_device",
        "held_bytes_per_device", "step_time_s")
print("RESULT " + json.dumps({
    "runs": [{k: r[k] for k in keep} for r in (first, resumed, other, whole)],
    "resumed_vs_whole": float(np.max(np.abs(flat(resumed["lora"]) - w))),
    "other_mesh_vs_whole": float(np.linalg.norm(flat(other["lora"]) - w)
                                 / np.linalg.norm(w)),
    "leaves": len(jax.tree.leaves(whole["lora"])),
    "moved": float(np.max(np.abs(w))),
}))
"""


def _env():
    return dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
                + " --xla_force_host_platform_device_count=4")


def test_resume_equals_uninterrupted_run(tmp_path):
    tiny = ["--quiet", "--steps", "3", "--batch", "4", "--lr", "1e-3", "--out",
            str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(tiny), str(tmp_path / "ckpt")],
        capture_output=True, text=True, env=_env(), cwd=EXAMPLES,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    r = json.loads(out.split("RESULT ", 1)[1])
    first, resumed, other, whole = r["runs"]
    for run in (first, resumed, whole):
        assert run["devices"] == 4 and run["mesh"] == {"data": 2, "model": 2}
    # The interrupted run saved at steps 2 and 3; the resumed one started from the
    # latest, 3, ran steps 4 and 5 and saved 5.
    assert (first["start_step"], first["resumed_from"]) == (0, None)
    assert first["checkpoint_step"] == 3 and len(first["losses"]) == 3
    assert (resumed["start_step"], resumed["resumed_from"]) == (3, 3)
    assert len(resumed["losses"]) == 2 and resumed["checkpoint_step"] == 5
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["2", "3", "5"]
    # The resumed run ends where the uninterrupted one does: the same compiled
    # program, the same batches (deterministic in the step) and the state restored
    # bit for bit, so the LoRA factors agree exactly (float32; they moved: B starts
    # at zero).
    assert r["leaves"] == 2 * 14 and r["moved"] > 0
    assert r["resumed_vs_whole"] == 0.0
    assert first["losses"] + resumed["losses"] == whole["losses"]
    assert resumed["reward_start"] == first["reward_end"]
    # The loss (minus the ink reward) decreased: on the training batches, and on the
    # fixed held-out batch evaluated before and after.
    assert whole["losses"][-1] < whole["losses"][0]
    assert whole["reward_end"] > whole["reward_start"]
    # The checkpoint resumes on another mesh too (Orbax reshards on restore); there
    # the sums are partitioned differently, so the run agrees to float32 round-off
    # (the LoRA factors to 3e-7 relative, measured).
    assert other["mesh"] == {"data": 4, "model": 1}
    assert (other["start_step"], other["resumed_from"]) == (3, 3)
    assert other["checkpoint_step"] == 5
    assert abs(other["reward_start"] - first["reward_end"]) < 1e-5
    assert max(abs(a - b) for a, b in zip(other["losses"], resumed["losses"])) < 1e-5
    assert r["other_mesh_vs_whole"] < 1e-5
    # Per-device memory: XLA's plan for the train step, printed and returned, and
    # the bytes each device holds (the train step's arguments).
    assert out.count("per-device memory of the train step") == 4
    assert out.count("held per device") == 4 and out.count("step time:") == 4
    mem = whole["memory_per_device"]
    assert min(mem["argument_bytes"], mem["output_bytes"], mem["temp_bytes"]) > 0
    held = whole["held_bytes_per_device"]
    assert len(held) == 4
    assert abs(sum(held.values()) / 4 - mem["argument_bytes"]) < 1e4
    # FSDP: with model = 2 a device holds about half of what it holds at model = 1.
    ratio = sum(held.values()) / sum(other["held_bytes_per_device"].values())
    assert 0.4 < ratio < 0.6
    assert whole["step_time_s"] > 0


def test_help():
    out = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "sharded_finetune.py"), "--help"],
        capture_output=True, text=True, check=True, cwd=EXAMPLES,
    ).stdout
    usage, rest = out.split("\n\n", 1)
    description, options = rest.split("\n\noptions:\n", 1)
    assert " ".join(description.split()).startswith(
        "LoRA reward fine-tuning of the digits model on a device mesh")
    for flag in ("--adjoint", "--data", "--model", "--ckpt-dir", "--resume", "--unet",
                 "--quiet"):
        assert flag in options
    # Every option but -h shows its default.
    blocks = [b for b in options.replace("\n  -", "\n\x00-").split("\x00")[1:]
              if not b.startswith("-h")]
    assert blocks and all("(default:" in b for b in blocks), blocks
