"""The documentation site's "Measured results" pages, generated from the JSON that the
benchmarks write (never copied by hand): each page names the command that produced
its data, the machine and the date, then renders the tables with the same code the
benchmark itself prints them with, and shows the figures next to the data.

The site's build hook (`docs/_hooks.py`) calls `pages()`; to print one page:

    python benchmarks/results_pages.py compare-mlp
"""

import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOCS = os.path.join(ROOT, "docs")
# Where a JSON carries no `meta` of its own: every committed figure of this project was
# measured on a 2-core CPU machine (which CPU model has changed between sessions).
PROJECT_MACHINE = ("a 2-core x86_64 CPU, 24 GiB, no GPU (JAX on CPU): the project's "
                   "machine on that date; this JSON records no more")


@dataclasses.dataclass(frozen=True)
class Page:
    slug: str  # the page is results/<slug>.md
    title: str
    data: str  # the JSON, relative to docs/
    command: str
    claim: str  # what the benchmark checks, one or two sentences
    render: Callable[[dict | list], str]  # the JSON -> markdown
    figures: tuple[str, ...] = ()  # relative to docs/
    extra: tuple[str, ...] = ()  # further JSON of the same page (re-runs), rendered alike
    note: str = ""  # what is known about the data beyond its JSON (a caveat)


# ---- provenance ---------------------------------------------------------------------
def _git_date(path: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", path], cwd=ROOT,
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def provenance(page: Page, data) -> str:
    """The command, machine and date of a page's data: its JSON's `meta` where the
    benchmark records one, else the project machine and the date the JSON was
    committed (or, outside a git checkout, last written)."""
    meta = data.get("meta", {}) if isinstance(data, dict) else {}
    path = os.path.join(DOCS, page.data)
    date = meta.get("date") or _git_date(path)
    if date is None:
        stamp = os.path.getmtime(path)
        date = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).date()
    machine = meta.get("machine") or meta.get("device") or PROJECT_MACHINE
    return (
        f"**Command:** `{meta.get('command', page.command)}`  \n"
        f"**Machine:** {machine}  \n"
        f"**Date:** {date}  \n"
        f"**Data:** [`{page.data}`](../{page.data})"
    )


# ---- renderers ----------------------------------------------------------------------
def _compare(data) -> str:
    from adjoint_jax.bench._report import markdown_tables

    return markdown_tables(data)


def _benchmark(name: str):
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return __import__(name)


def _peers(data) -> str:
    peers = _benchmark("peers")
    rows = [{k: (math.nan if v is None else v) for k, v in r.items()}
            for r in data["rows"]]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "peers.md")
        peers.write_markdown(rows, peers.ratios(rows), path, data["problem"],
                             data["batch"], data.get("checks"))
        with open(path, encoding="utf-8") as f:
            return f.read()


def _frontier(data) -> str:
    return _benchmark("frontier")._markdown(data["adaptive"], data["rex"])


def _scale(data) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scale.md")
        _benchmark("scale").write_markdown(data, path)
        with open(path, encoding="utf-8") as f:
            return f.read()


def _diffusers(kind: str):
    def render(data) -> str:
        report = _benchmark("pipeline_report")
        table = (report.markdown if kind == "pipelines" else report.options_markdown)
        return report.INTRO[kind] + "\n\n" + table(data["rows"])

    return render


def _cell(key: str, v) -> str:
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, float):
        if key.startswith("accuracy"):
            return f"{v:.0%}"
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v).replace("|", "\\|")


def _rows_table(data) -> str:
    """A study of `examples/` (`rows`, one per method, and the run's settings)."""
    settings = {k: v for k, v in data.items()
                if not isinstance(v, (list, dict)) and k != "table"}
    lines = ["Settings: " + ", ".join(f"{k} = {_cell(k, v)}"
                                       for k, v in settings.items()), ""]
    keys = list(dict.fromkeys(k for r in data["rows"] for k in r))
    lines += ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for r in data["rows"]:
        lines.append("| " + " | ".join(_cell(k, r.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


# ---- the pages ----------------------------------------------------------------------
_COMPARE = "adjoint-jax compare --problem {problem} --dtype float32 --samplers {s} " \
           "--adjoints {a} --steps {n} --out docs/compare_{out}"
PAGES = (
    Page("compare-mlp", "Strategies on a random MLP: memory, cost and accuracy in N",
         "compare_mlp/results.json",
         _COMPARE.format(
             problem="mlp", s="'DPMSolver2()' 'ReversibleHeun()'",
             a="'DTO()' \"DTO(checkpoints='steps')\" 'DTO(checkpoints=8)' "
               "'AdjointDEIS()' 'AdjointDEIS(order=2)' 'RecordedAdjoint()' "
               "'InterpolatedAdjoint()' 'AdjointDPM(rtol=1e-4, atol=1e-4)' "
               "'ReversibleAdjoint()'", n="16 64 256", out="mlp"),
         "For each strategy: XLA's temporary memory of the jitted gradient as N grows, "
         "gradient time over sampling time (R), model evaluations of the backward pass, "
         "and the gradient's error against the exact gradient of the sampler (DTO).",
         _compare, ("compare_mlp/pareto.png", "compare_mlp/error_vs_steps.png",
                    "compare_mlp/memory_vs_steps.png")),
    Page("compare-reversible", "Reversible samplers at the cost floor",
         "compare_reversible/results.json",
         _COMPARE.format(
             problem="mlp", s="'DPMSolver2()' 'ReversibleHeun()' 'AsyncLeapfrog()' "
             "'BELM()' 'BDIA()' 'EDICT()' 'McCallumFoster(DPMSolver2())'",
             a="'DTO()' \"DTO(checkpoints='steps')\" 'AdjointDEIS()' "
               "'ReversibleAdjoint()'", n="16 64 256", out="reversible")
         + " --no-figures",
         "Every reversible sampler with its fused `ReversibleAdjoint()` against DTO and "
         "AdjointDEIS on the same MLP problem: memory, R, and the float32 error of the "
         "rebuilt trajectory's gradient.",
         _compare, extra=("compare_reversible/rerun_reversible_adjoint.json",)),
    Page("compare-digits", "Strategies on the trained digits model",
         "compare_digits/results.json",
         "adjoint-jax compare --problem digits --batch 8 --dtype float32 --samplers "
         "'DPMSolver2()' 'ReversibleHeun()' 'AsyncLeapfrog()' 'BELM()' 'BDIA()' "
         "'EDICT()' 'McCallumFoster(DPMSolver2())' --adjoints 'DTO()' "
         "\"DTO(checkpoints='steps')\" 'AdjointDEIS()' 'ReversibleAdjoint()' "
         "--steps 20 --no-figures --out docs/compare_digits",
         "The same strategies where the model's cost dominates (`aj.zoo.digits()`, a "
         "trained conditional UNet-like network): R near 3 for the memory-flat ones.",
         _compare, extra=("compare_digits/rerun_reversible_adjoint.json",)),
    Page("peers-mixture", "Against diffrax and torchdiffeq: the sharp mixture",
         "peers/peers.json", "python benchmarks/peers.py --out docs/peers",
         "At equal gradient error, our best strategy against diffrax "
         "(RecursiveCheckpointAdjoint, BacksolveAdjoint; fixed-step and adaptive) and "
         "torchdiffeq's odeint_adjoint, on the same ODE, model, x_T and loss.",
         _peers, ("peers/peers_pareto.png",)),
    Page("peers-digits", "Against diffrax and torchdiffeq: the digits model",
         "peers_digits/peers.json",
         "python benchmarks/peers.py --problem digits --torch-threads 1 "
         "--out docs/peers_digits",
         "The peers comparison where the trained network's cost dominates.",
         _peers, ("peers_digits/peers_pareto.png",)),
    Page("peers-digits-canonical",
         "Against diffrax on the digits model, in diffrax's own variables",
         "peers_digits_canonical/peers.json",
         "python benchmarks/peers.py --problem digits --peer-convs canonical --no-torch "
         "--out docs/peers_digits_canonical",
         "The digits comparison with diffrax solving in its canonical time variables "
         "(t and log-SNR) rather than ours.",
         _peers, ("peers_digits_canonical/peers_pareto.png",)),
    Page("frontier", "The accuracy frontier: error-controlled and reversible RK grids",
         "frontier/frontier.json", "python benchmarks/frontier.py --out docs/frontier",
         "Error-controlled time grids reach any tolerance at a cost set by the "
         "tableau's order; reversible exponential Runge–Kutta stays memory-flat.",
         _frontier,
         note="The R column was measured while another benchmark shared the 2 cores, "
         "with an engine version whose DTO gradients were 1.5–2× slower, since fixed: "
         "read the memory, which XLA computes deterministically, not R."),
    Page("scale", "At latent-diffusion scale", "scale/scale.json",
         "python benchmarks/scale.py --out docs/scale",
         "On a Stable-Diffusion-shaped UNet with cross-attention, CFG, a checkpointed "
         "decoder in the loss and a LoRA-only gradient, every strategy runs, the "
         "memory-flat ones stay flat in N and R stays near the floor.",
         _scale),
    Page("reward-finetune", "Reward fine-tuning estimators at an equal budget",
         "estimators/reward_finetune.json",
         "python examples/reward_finetune.py --out docs/estimators",
         "Every estimator (DTO, DRaFT-K, DRaFT-LV, AlignProp, trajectory surrogates, "
         "AdjointDEIS) fine-tunes the digits model's FiLM layers towards thicker "
         "strokes with the same budget of model evaluations.",
         _rows_table, ("estimators/reward_finetune.png",)),
    Page("noise-optimisation", "Direct noise optimisation (DNO)",
         "estimators/noise_optimisation.json",
         "python examples/noise_optimisation.py --out docs/estimators",
         "Optimising x_T alone against optimising every injected noise, with and "
         "without the DNO regulariser that keeps the noise Gaussian.",
         _rows_table, ("estimators/noise_optimisation.png",)),
    Page("implicit-adjoint-matching", "Implicit Diffusion and Adjoint Matching",
         "estimators/implicit_adjoint_matching.json",
         "python examples/implicit_adjoint_matching.py --out docs/estimators",
         "DTO, Implicit Diffusion and Adjoint Matching fine-tune the same layers at an "
         "equal budget of network evaluations; reward, accuracy and diversity.",
         _rows_table, ("estimators/implicit_adjoint_matching.png",)),
    Page("diffusers-pipelines", "Public diffusers pipelines, reproduced",
         "diffusers/pipelines.json", "python benchmarks/pipelines.py --docs docs/diffusers",
         "Each public pipeline set-up (its shipped scheduler config and what it passes "
         "to set_timesteps) against the real diffusers in float64.",
         _diffusers("pipelines")),
    Page("diffusers-options", "Every diffusers scheduler option, reproduced",
         "diffusers/options.json", "python benchmarks/pipelines.py --docs docs/diffusers",
         "Every scheduler class × option that changes the numbers, against the real "
         "diffusers in float64, or refused with the reason.",
         _diffusers("options")),
)


def _load(rel: str):
    with open(os.path.join(DOCS, rel), encoding="utf-8") as f:
        return json.load(f)


def render(page: Page) -> str:
    data = _load(page.data)
    parts = [f"# {page.title}", "", page.claim, "", provenance(page, data), ""]
    if page.note:
        parts += [f"!!! note\n    {page.note}", ""]
    parts += [page.render(data)]
    for rel in page.extra:
        parts += ["", f"## Re-run: `{rel}`", "",
                  page.render(_load(rel))]
    if page.figures:  # each opens at full size when clicked
        parts += ["", "## Figures", "", "Drawn by the same command; click for full size.",
                  ""]
        parts += [f"[![{f}](../{f})](../{f})\n" for f in page.figures]
    return "\n".join(parts).rstrip() + "\n"


def index() -> str:
    lines = ["# Measured results", "",
             "Every page below is generated when the site is built, from the JSON the "
             "benchmark wrote; each names its command, machine and date. Re-run the "
             "command to refresh a page.", "",
             "| page | what it checks |", "| --- | --- |"]
    for p in PAGES:
        lines.append(f"| [{p.title}]({p.slug}.md) | {p.claim} |")
    lines += ["", "The sharding measurements (collectives and per-device memory) are in "
              "the [sharding guide](../sharding.md), regenerated by "
              "`python benchmarks/sharding_report.py`."]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """{`results/<slug>.md`: markdown} for every page, and `results/index.md`."""
    out = {f"results/{p.slug}.md": render(p) for p in PAGES}
    out["results/index.md"] = index()
    return out


if __name__ == "__main__":
    wanted = sys.argv[1:] or [p.slug for p in PAGES]
    for p in PAGES:
        if p.slug in wanted:
            print(render(p))
