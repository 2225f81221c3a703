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


# The studies: they write their table, JSON and figure into docs/estimators/<name>.*,
# which has a results page, results/<name with dashes>.md.
_STUDIES = ("reward_finetune", "noise_optimisation", "implicit_adjoint_matching")
# Where the figure's command is not `--out <its folder>`: train_digits writes its
# weights into --out and the figure where --png says.
_FIGURE_COMMANDS = {
    "train_digits": "python examples/train_digits.py --out /tmp/digits "
                    "--png docs/examples/train_digits/digits_samples.png",
}


def _examples() -> list[str]:
    paths = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))
    return [os.path.basename(p)[:-3] for p in paths
            if not os.path.basename(p).startswith("_")]


def _figures(name: str) -> list[str]:
    own = sorted(glob.glob(os.path.join(ROOT, "docs", "examples", name, "*.png")))
    own = [os.path.relpath(p, os.path.join(ROOT, "docs")) for p in own]
    return own + ([f"estimators/{name}.png"] if name in _STUDIES else [])


def example_page(name: str) -> str:
    path = os.path.join(ROOT, "examples", f"{name}.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    doc = ast.get_docstring(ast.parse(source)) or ""
    title, _, body = doc.partition("\n")
    out_dir = "docs/estimators" if name in _STUDIES else f"docs/examples/{name}"
    command = _FIGURE_COMMANDS.get(name, f"python examples/{name}.py --out {out_dir}")
    lines = [f"# `{name}.py`", "", title.strip(), body.strip(), "",
             "## Run it", "", "```bash", "pip install -e \".[examples]\"",
             f"python examples/{name}.py --help", f"python examples/{name}.py", "```", ""]
    figures = _figures(name)
    if figures:
        lines += ["## Its figure", "",
                  f"Written by `{command}` (the committed figure below).", ""]
        lines += [f"![{name}](../{f})" for f in figures] + [""]
    else:
        lines += ["This example prints its results and writes no figure.", ""]
    if name in _STUDIES:
        slug = name.replace("_", "-")
        lines += [f"Measured results: [the results page](../results/{slug}.md).",
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
