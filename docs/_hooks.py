"""MkDocs hook: the pages generated at build time.

- `results/*.md`: the measured results, rendered from the benchmarks' JSON by
  `benchmarks/results_pages.py` (command, machine and date on every page).
- `examples/*.md`: one page per script in `examples/`: its docstring, how to run it,
  the figure it writes (committed under `docs/examples/<name>/`, or beside the
  results it produces), and its source.
"""

import ast
import glob
import os
import sys

from mkdocs.structure.files import File


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import results_pages  # noqa: E402


# Figures an example writes into a results folder rather than docs/examples/<name>/.
_FIGURES_ELSEWHERE = {
    "reward_finetune": ("estimators/reward_finetune.png",),
    "noise_optimisation": ("estimators/noise_optimisation.png",),
    "implicit_adjoint_matching": ("estimators/implicit_adjoint_matching.png",),
}
_RESULTS_OF = {
    "reward_finetune": "reward-finetune",
    "noise_optimisation": "noise-optimisation",
    "implicit_adjoint_matching": "implicit-adjoint-matching",
}


def _examples() -> list[str]:
    paths = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))
    return [os.path.basename(p)[:-3] for p in paths
            if not os.path.basename(p).startswith("_")]


def _figures(name: str) -> list[str]:
    own = sorted(glob.glob(os.path.join(ROOT, "docs", "examples", name, "*.png")))
    own = [os.path.relpath(p, os.path.join(ROOT, "docs")) for p in own]
    return own + list(_FIGURES_ELSEWHERE.get(name, ()))


def example_page(name: str) -> str:
    path = os.path.join(ROOT, "examples", f"{name}.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    doc = ast.get_docstring(ast.parse(source)) or ""
    title, _, body = doc.partition("\n")
    out_dir = f"docs/examples/{name}" if name not in _FIGURES_ELSEWHERE else "docs/estimators"
    lines = [f"# `{name}.py`", "", title.strip(), body.strip(), "",
             "## Run it", "", "```bash", "pip install -e \".[examples]\"",
             f"python examples/{name}.py --help", f"python examples/{name}.py", "```", ""]
    figures = _figures(name)
    if figures:
        lines += ["## Its figure", "",
                  f"Written by `python examples/{name}.py --out {out_dir}` "
                  "(the committed figure below)."
                  if name not in ("train_digits",) else
                  "Written by the command above (the committed figure below).", ""]
        lines += [f"![{name}](../{f})" for f in figures] + [""]
    else:
        lines += ["This example prints its results and writes no figure.", ""]
    if name in _RESULTS_OF:
        lines += [f"Measured results: [the results page](../results/{_RESULTS_OF[name]}.md).",
                  ""]
    lines += ["## Source", "", f'??? example "examples/{name}.py"', "",
              "    ```python"]
    lines += ["    " + ln if ln else "" for ln in source.splitlines()]
    lines += ["    ```", ""]
    return "\n".join(lines)


def examples_index() -> str:
    lines = ["# Examples", "",
             "Scripts in `examples/`, each runnable on a CPU in minutes (most in "
             "seconds with their `--help` options for a smaller run); the test suite runs "
             "each of them at a small size.", "",
             "| script | what it shows |", "| --- | --- |"]
    for name in _examples():
        with open(os.path.join(ROOT, "examples", f"{name}.py"), encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        first = doc.split("\n\n")[0].replace("\n", " ").replace("|", "\\|")
        lines.append(f"| [`{name}.py`]({name}.md) | {first} |")
    return "\n".join(lines) + "\n"


def generated() -> dict[str, str]:
    pages = dict(results_pages.pages())
    pages["examples/index.md"] = examples_index()
    for name in _examples():
        pages[f"examples/{name}.md"] = example_page(name)
    return pages


def on_files(files, config):
    for uri, content in generated().items():
        files.append(File.generated(config, uri, content=content))
    return files
