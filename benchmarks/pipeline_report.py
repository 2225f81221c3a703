"""The markdown and JSON of `benchmarks/pipelines.py`: the pipeline table, the option
table (with its per-class summary), and the header of the files `--docs` writes
(the command, the machine, the date, the library versions, the run time)."""

import datetime
import json
import os
import platform
import re
import sys

import numpy as np


TOL = 1e-10


def _elide(match) -> str:
    items = match.group(1).split(", ")
    if len(items) <= 6:
        return match.group(0)
    return f"({', '.join(items[:3])}, …, {items[-1]}) ({len(items)})"


def one_line(sampler) -> str:
    """The sampler's repr on one line, tuples of more than 6 numbers elided."""
    text = " ".join(repr(sampler).replace("\n", " ").split())
    text = re.sub(r"\(\s+", "(", re.sub(r",?\s+\)", ")", text))
    return re.sub(r"\(((?:-?[0-9.e+-]+|True|False), (?:(?:-?[0-9.e+-]+|True|False)"
                  r"(?:, )?)+)\)", _elide, text)


def short(sampler) -> str:
    text = one_line(sampler)
    return text if len(text) <= 80 else text[:77] + "..."


def call_text(kwargs) -> str:
    """`set_timesteps(...)` as the pipeline calls it."""
    parts = []
    for k, v in kwargs.items():
        if k == "num_inference_steps":
            parts.append(str(v))
        elif k in ("sigmas", "timesteps"):
            v = np.asarray(v)
            shown = ", ".join(f"{x:.4g}" for x in v) if len(v) <= 4 else (
                f"{v[0]:.4g}, {v[1]:.4g}, …, {v[-1]:.4g}")
            parts.append(f"{k}=[{shown}] ({len(v)})")
        else:
            parts.append(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v!r}")
    return f"set_timesteps({', '.join(parts)})"


INTRO = {
    "pipelines": "Public diffusers pipeline set-ups "
    "(`benchmarks/pipeline_configs.py`): diffusers' scheduler loop in float64 "
    "against `aj.from_diffusers` + `aj.sample` on the same analytic network, z and "
    "noises. Reproduced means max |ours − diffusers| ≤ 1e-10 over the final latents.",
    "options": "Every scheduler class `aj.from_diffusers` supports × each option value "
    "that changes the numbers, or that `aj` refuses "
    "(`benchmarks/option_configs.py`), at two step counts: diffusers' scheduler loop "
    "in float64 against `aj.from_diffusers` + `aj.sample` on the same analytic "
    "network, z and noises. Reproduced means max |ours − diffusers| ≤ 1e-10; a "
    "refused option shows `aj`'s message; 'diffusers raises' is an option diffusers "
    "itself rejects; 'diffusers non-finite' a run where diffusers returns NaN.",
}
EPILOG = """\
status of a row:
  reproduced            max |ours − diffusers| over the final latents <= 1e-10
  refused: MESSAGE      aj.from_diffusers raises for the option (its message);
                        diffusers' own loop still runs (its error, if any, shown)
  diffusers raises      diffusers rejects the option itself (and whether aj
                        accepts it)
  diffusers non-finite  diffusers returns NaN/inf where ours is finite
  differs / error       more than 1e-10 apart / the harness failed (traceback
                        in the JSON)

examples:
  python benchmarks/pipelines.py                          # the pipeline table
  python benchmarks/pipelines.py --table options --only UniPCMultistepScheduler
  python benchmarks/pipelines.py --table options --only DDIMScheduler:3 --steps 5
  python benchmarks/pipelines.py --docs docs/diffusers    # both tables, as in docs/

--json PATH writes the rows as a JSON list (with --table both: PATH with
.pipelines.json / .options.json in place of .json). --docs DIR writes
DIR/pipelines.md, DIR/options.md and DIR/pipelines.json, DIR/options.json
({"meta": command, machine, date, versions, seconds; "rows": [...]}).
Needs the `test` extra (diffusers, torch); the option table takes about 8
minutes on 2 CPU cores, the pipeline table about 2.
"""
TITLES = {"pipelines": "Public diffusers pipelines through `aj.from_diffusers`",
          "options": "Every diffusers scheduler option through `aj.from_diffusers`"}


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _diff(row) -> str:
    return "—" if row.get("diff") is None else f"{row['diff']:.1e}"


def status_text(row: dict) -> str:
    """reproduced (≤ 1e-10) / refused: … / diffusers raises: … / diffusers
    non-finite: … / differs / error: …"""
    st = row["status"]
    if st == "reproduced":
        return "reproduced (≤ 1e-10)"
    if st == "differs":
        return "differs"
    text = f"{st}: {row.get('message', '')}"
    if st == "refused" and row.get("diffusers_error"):
        text += f" (diffusers raises too: {row['diffusers_error']})"
    elif st == "refused" and row.get("diffusers_finite") is False:
        text += " (diffusers' own result is not finite)"
    return text


def counts(rows) -> dict:
    out = {}
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return dict(sorted(out.items()))


def summary_line(rows) -> str:
    done = [r["diff"] for r in rows if r["status"] == "reproduced"]
    worst = f"; largest reproduced difference {max(done):.1e}" if done else ""
    text = ", ".join(f"{k}: {v}" for k, v in counts(rows).items())
    return f"{len(rows)} rows — {text}{worst}"


# ---- the pipeline table --------------------------------------------------------------

def _sampler_cell(row: dict) -> str:
    if "grid" not in row:
        return row.get("sampler", "—")
    return f"{row['sampler']} on {row['grid']} ({row['aj_steps']} steps)"


def markdown(rows) -> str:
    """The pipeline table and, below it, what each set-up passes and draws."""
    lines = ["| pipeline | scheduler + options | aj sampler | N "
             "| max \\|ours − diffusers\\| "
             "| status |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {_cell(r['pipeline'] + ' · ' + r['model'])} "
            f"| {_cell(r.get('scheduler', '—'))} | {_cell(_sampler_cell(r))} "
            f"| {r['N']} | {_diff(r)} | {_cell(status_text(r))} |"
        )
    inputs = ["| set-up | the pipeline calls | latents | step kwargs | diffusers draws "
              "| from_diffusers warned |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        warns = r.get("warnings") or []
        warned = "; ".join(w.split(" are not known")[0] for w in warns)
        inputs.append(
            f"| {r['key']} | {_cell(r.get('call', '—'))} "
            f"| {_cell(r.get('latents', '—'))} "
            f"| {_cell(r['step_kwargs'] or '—')} | {r.get('draws', '—')} "
            f"| {_cell(warned or '—')} |"
        )
    return ("\n".join(lines) + f"\n\n{summary_line(rows)}\n\n" + "\n".join(inputs))


# ---- the option table ----------------------------------------------------------------

def _option_sampler(row: dict) -> str:
    if "aj_steps" in row:
        return f"`{row['sampler']}` ({row['aj_steps']} steps)"
    if row.get("aj_accepts"):
        return f"`{row['aj_accepts']}`"
    return "—"


def options_markdown(rows) -> str:
    """The per-class summary, then one row per class × option × N."""
    by_class = {}
    for r in rows:
        by_class.setdefault(r["class"], []).append(r)
    head = ["| scheduler | rows | reproduced | refused | other | largest reproduced "
            "difference |", "| --- | --- | --- | --- | --- | --- |"]
    for name, rs in by_class.items():
        c = counts(rs)
        done = [r["diff"] for r in rs if r["status"] == "reproduced"]
        other = sum(v for k, v in c.items() if k not in ("reproduced", "refused"))
        head.append(f"| {name} | {len(rs)} | {c.get('reproduced', 0)} "
                    f"| {c.get('refused', 0)} | {other} "
                    f"| {max(done):.1e} |" if done else
                    f"| {name} | {len(rs)} | 0 | {c.get('refused', 0)} | {other} | — |")
    lines = ["| scheduler | options | aj sampler | N | max \\|ours − diffusers\\| "
             "| status |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['class']} | {_cell(r['options'])} | {_cell(_option_sampler(r))} "
            f"| {r['N']} | {_diff(r)} | {_cell(status_text(r))} |"
        )
    return ("\n".join(head) + f"\n\n{summary_line(rows)}\n\n" + "\n".join(lines))


# ---- the files `--docs` writes -------------------------------------------------------

def _version(module):
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return "not installed"


def meta(argv, seconds) -> dict:
    """The command, the machine, the date and the versions of one run."""
    import jax

    devices = sorted({d.platform for d in jax.devices()})
    return {
        "command": "python benchmarks/pipelines.py " + " ".join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} CPUs, no GPU (JAX devices: {', '.join(devices)})",
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("diffusers", "jax", "torch", "numpy")},
        "seconds": round(seconds, 1),
    }


def header(title, info, intro) -> str:
    v = info["versions"]
    return "\n".join([
        f"# {title}", "",
        f"Generated by `{info['command']}` on {info['date']}: {info['machine']}; "
        f"Python {info['python']}, diffusers {v['diffusers']}, jax {v['jax']}, "
        f"torch {v['torch']}, numpy {v['numpy']}; {info['seconds']} s.",
        "", intro, ""])


def write_docs(folder, name, table, rows, info) -> None:
    """`folder/name.md` (the header, then the table) and `folder/name.json`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(header(TITLES[name], info, INTRO[name]) + "\n" + table + "\n")
    with open(os.path.join(folder, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": info, "rows": rows}, f, indent=1, default=str,
                  ensure_ascii=False)
    print(f"wrote {folder}/{name}.md and {name}.json", file=sys.stderr)
