"""`benchmarks/scale.py --tiny`: every strategy of the latent-diffusion-sized benchmark
runs (UNet with cross-attention, CFG, checkpointed decoder in the loss, LoRA-only
gradient, bfloat16 base weights) and writes its table and JSON. A smoke test: the
figures are not asserted, only that every configuration ran and is finite."""

import importlib.util
import json
import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location(
        "scale_bench", os.path.join(ROOT, "benchmarks", "scale.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scale_tiny_runs_every_strategy(tmp_path, capsys):
    scale = _load()
    # bfloat16 base weights: the mixed-precision path (float32 adapters and state).
    rc = scale.main(["--tiny", "--dtypes", "bfloat16", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("device: ")
    data = json.loads((tmp_path / "scale.json").read_text())
    ran = {(r["sampler"], r["adjoint"]) for r in data["rows"]}
    assert ran == set(scale.strategies(2))
    for r in data["rows"]:
        assert r["finite"] and r["grad_norm"] > 0, r
        assert r["temp_bytes"] > 0 and r["grad_time_s"] > 0, r
    table = (tmp_path / "scale.md").read_text()
    assert table.count("| bfloat16 | 2 |") == len(ran)
