"""The guides run as written: every ```python block of docs/index.md and
docs/guides/*.md is executed, and every relative link and image of those pages
points to a file (or to a page the docs hook generates at build time).

The blocks of one page run in order in one fresh namespace (a later block may use
the names of an earlier one). All pages run in one subprocess, so that JAX is
imported once, with the user's defaults: `JAX_ENABLE_X64` unset (float32) and the
CPU backend. A block is skipped only when the line directly above its fence is
`<!-- not executed: <reason> -->`, for a block that needs a GPU or minutes of CPU;
the page must then say so in its visible text ("not run by the tests").
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
GUIDES = os.path.join(DOCS, "guides")

# Pages that docs/_hooks.py writes at build time (they do not exist in the tree).
GENERATED = {
    "results/diffusers-pipelines.md",
    "results/diffusers-options.md",
    "results/reward-finetune.md",
    "results/noise-optimisation.md",
    "results/implicit-adjoint-matching.md",
    "results/compare-mlp.md",
    "results/compare-digits.md",
    "results/compare-reversible.md",
    "results/peers-mixture.md",
    "results/peers-digits.md",
    "results/frontier.md",
    "results/scale.md",
    "examples/reward_finetune.md",
    "examples/noise_optimisation.md",
    "examples/implicit_adjoint_matching.md",
}


def nav_pages() -> set[str]:
    """The pages mkdocs.yml's nav lists (written by others, e.g. the API pages; the
    strict build checks that they exist)."""
    path = os.path.join(ROOT, "mkdocs.yml")
    if not os.path.exists(path):
        return set()
    text = open(path, encoding="utf-8").read()
    nav = text[text.find("\nnav:"):]
    return set(re.findall(r"([\w./-]+\.md)\s*$", nav, flags=re.M))


SKIP_MARK = re.compile(r"^\s*<!--\s*not executed:\s*(?P<reason>\S.*?)\s*-->\s*$")
SKIP_NOTICE = "not run by the tests"
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


def pages() -> list[str]:
    guides = sorted(
        os.path.join(GUIDES, f) for f in os.listdir(GUIDES) if f.endswith(".md")
    ) if os.path.isdir(GUIDES) else []
    return [os.path.join(DOCS, "index.md")] + guides


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def blocks(path: str) -> list[dict]:
    """The fenced code blocks of a page: language, first line of code (1-based),
    code (dedented), and the skip reason if any."""
    lines = open(path, encoding="utf-8").read().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], m["indent"]
        start = i + 1
        j = start
        while j < len(lines) and not (
            lines[j].strip().startswith(fence[0] * len(fence))
            and lines[j].strip().strip(fence[0]) == ""
            and len(lines[j]) - len(lines[j].lstrip()) <= len(indent)
        ):
            j += 1
        skip = SKIP_MARK.match(lines[i - 1]) if i > 0 else None
        out.append(
            dict(
                lang=m["info"].lower(),
                line=start + 1,
                code=textwrap.dedent("\n".join(lines[start:j])),
                skip=skip["reason"] if skip else None,
                marked=bool(skip),
            )
        )
        i = j + 1
    return out


# The runner: one process, every page in a fresh namespace, blocks in order. A
# block is compiled with the page's path as its file name and padded so that a
# traceback's line numbers are the page's own.
RUNNER = r"""
import json, sys, time, traceback
pages = json.load(sys.stdin)
results = []
for page in pages:
    ns = {"__name__": "__docs__"}
    t0 = time.perf_counter()
    failure = None
    for block in page["blocks"]:
        source = "\n" * (block["line"] - 1) + block["code"] + "\n"
        try:
            exec(compile(source, page["path"], "exec"), ns)
        except BaseException:
            failure = dict(line=block["line"], traceback=traceback.format_exc())
            break
    results.append(dict(path=page["path"], seconds=time.perf_counter() - t0,
                        blocks=len(page["blocks"]), failure=failure))
    print(f"{page['path']}: {time.perf_counter() - t0:.1f} s", file=sys.stderr,
          flush=True)
print("\n@@RESULTS@@" + json.dumps(results))
"""


def _to_run() -> list[dict]:
    todo = []
    for path in pages():
        code = [
            b for b in blocks(path) if b["lang"] in ("python", "py") and not b["skip"]
        ]
        todo.append(dict(path=rel(path), blocks=code))
    return todo


def test_python_blocks_run():
    todo = _to_run()
    assert sum(len(p["blocks"]) for p in todo) > 0
    env = dict(os.environ)
    env.pop("JAX_ENABLE_X64", None)
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("MPLBACKEND", "Agg")
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(todo),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    head, sep, tail = proc.stdout.rpartition("\n@@RESULTS@@")
    assert sep, (
        f"the docs runner did not finish (exit code {proc.returncode}):\n"
        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    results = json.loads(tail)
    failures = [
        f"{r['path']}, the block starting at line {r['failure']['line']}:\n"
        f"{r['failure']['traceback']}"
        for r in results
        if r["failure"] is not None
    ]
    assert not failures, "\n\n".join(failures) + "\n(stderr)\n" + proc.stderr[-2000:]


def test_skipped_blocks_are_marked_and_said_so():
    for path in pages():
        bs = blocks(path)
        text = open(path, encoding="utf-8").read()
        # A marker must sit directly above a fence, never stray.
        marks = [m for m in text.splitlines() if SKIP_MARK.match(m)]
        assert len(marks) == sum(b["marked"] for b in bs), (
            f"{rel(path)}: a `<!-- not executed: ... -->` line not directly above a "
            "code fence"
        )
        if any(b["skip"] for b in bs):
            visible = re.sub(r"<!--.*?-->", "", text, flags=re.S)
            assert SKIP_NOTICE in visible, (
                f"{rel(path)} skips a block; its text must say so ('{SKIP_NOTICE}')"
            )


LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)"
)
AUTOREF = re.compile(r"\]\[(?P<ident>adjoint_jax(?:\.[A-Za-z_][A-Za-z0-9_]*)+)\]")


def _strip_code(text: str) -> str:
    """The page without fenced code blocks and inline code (links inside code are
    not links)."""
    text = re.sub(r"^(\s*)(`{3,}|~{3,}).*?^\1\2\s*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


@pytest.mark.parametrize("path", pages(), ids=rel)
def test_relative_links_resolve(path):
    text = _strip_code(open(path, encoding="utf-8").read())
    here = os.path.dirname(path)
    bad = []
    for m in LINK.finditer(text):
        target = m["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # external, or an anchor on the same page
        file = target.split("#", 1)[0]
        resolved = os.path.normpath(os.path.join(here, file))
        in_docs = os.path.relpath(resolved, DOCS).replace(os.sep, "/")
        if os.path.exists(resolved) or in_docs in GENERATED | nav_pages():
            continue
        bad.append(target)
    assert not bad, f"{rel(path)}: links to missing files: {bad}"


@pytest.mark.parametrize("path", pages(), ids=rel)
def test_api_cross_references_name_public_objects(path):
    import importlib

    text = _strip_code(open(path, encoding="utf-8").read())
    bad = []
    for m in AUTOREF.finditer(text):
        parts = m["ident"].split(".")
        obj, ok = None, False
        for k in range(len(parts), 0, -1):  # longest importable module prefix
            try:
                obj = importlib.import_module(".".join(parts[:k]))
            except ImportError:
                continue
            ok = True
            for name in parts[k:]:
                if name.startswith("_") or not hasattr(obj, name):
                    ok = False
                    break
                obj = getattr(obj, name)
            break
        if not ok:
            bad.append(m["ident"])
    assert not bad, f"{rel(path)}: cross-references to no public object: {bad}"
