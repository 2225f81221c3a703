"""The documentation site builds in strict mode (a broken link, a missing page, an
unresolved API reference or a docstring that fails to render fails the build), and its
generated pages cover every benchmark's data and every example."""

import glob
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "docs"))

import _hooks  # noqa: E402


def test_site_builds_strict(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
         str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    # Every page the nav promises was written, generated ones included.
    for page in ("index.html", "api/sampling/index.html", "results/compare-mlp/index.html",
                 "examples/quickstart/index.html", "guides/choosing/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    html = (tmp_path / "site" / "api" / "sampling" / "index.html").read_text()
    assert 'id="adjoint_jax.sample"' in html  # mkdocstrings rendered the entry


def test_every_benchmark_json_has_a_results_page():
    import results_pages

    covered = {p.data for p in results_pages.PAGES}
    covered |= {e for p in results_pages.PAGES for e in p.extra}
    on_disk = {
        os.path.relpath(p, os.path.join(ROOT, "docs"))
        for p in glob.glob(os.path.join(ROOT, "docs", "*", "*.json"))
    }
    assert on_disk <= covered, f"JSON without a results page: {sorted(on_disk - covered)}"


@pytest.fixture(scope="module")
def pages():
    return _hooks.generated()


def test_every_results_page_names_command_machine_and_date(pages):
    results = {k: v for k, v in pages.items() if k.startswith("results/")}
    assert len(results) >= 14
    for uri, text in results.items():
        if uri.endswith("index.md"):
            continue
        for field in ("**Command:**", "**Machine:**", "**Date:**"):
            assert field in text, (uri, field)
        assert "| --- |" in text or "| ---: |" in text, f"{uri} has no table"


def test_every_example_has_a_page_with_its_figure(pages):
    for name in _hooks._examples():
        page = pages[f"examples/{name}.md"]
        assert f"python examples/{name}.py" in page, name
        figures = _hooks._figures(name)
        with open(os.path.join(ROOT, "examples", f"{name}.py")) as f:
            source = f.read()
        writes_figure = "savefig" in source or "save_" in source
        assert figures or not writes_figure, f"examples/{name}.py writes a figure; commit it"
        for fig in figures:
            assert os.path.isfile(os.path.join(ROOT, "docs", fig)), fig
            assert f"](../{fig})" in page, (name, fig)
