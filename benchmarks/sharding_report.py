"""Regenerates the measured tables of `docs/sharding.md` (collectives per strategy,
per-device memory) from `tests/sharding_worker.py` (8 simulated CPU devices).

    python benchmarks/sharding_report.py            # rewrites docs/sharding.md's tables

Each table sits between `<!-- NAME -->` and `<!-- /NAME -->` markers in the page;
the figures are XLA's (its compiled programs and memory analysis), so they change
only with the program or the XLA version.
"""

import json
import os
import re
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sharding_worker.py")
PAGE = os.path.join(ROOT, "docs", "sharding.md")


def run(mode: str) -> dict:
    out = subprocess.run([sys.executable, WORKER, mode], capture_output=True, text=True,
                         check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result.pop("devices")
    return result


def _counts(c: dict) -> str:
    parts = []
    for op in ("all-gather", "all-reduce", "reduce-scatter", "collective-permute",
               "all-to-all"):
        if op in c:
            loop = c.get(op + " (loop)", 0)
            parts.append(f"{c[op]} {op}" + (f" ({loop} in loops)" if loop else ""))
    return ", ".join(parts) or "none"


def collectives_table(meshes: dict) -> str:
    rows = ["| strategy | data8 | fsdp8 | data4 × fsdp2 |", "| --- | --- | --- | --- |"]
    for name, row in meshes.items():
        cells = [_counts(row[c]["collectives"]) for c in ("data8", "fsdp8", "data4_fsdp2")]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def memory_table(memory: dict) -> str:
    kib = lambda b: f"{b / 1024:,.0f}"  # noqa: E731
    rows = ["| strategy | one device: args / temp (KiB) | batch over 8 | FSDP over 8 |",
            "| --- | --- | --- | --- |"]
    for name, row in memory.items():
        cells = [f"{kib(row[c]['arguments'])} / {kib(row[c]['temp'])}"
                 for c in ("one", "data8", "fsdp8")]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def replace(page: str, marker: str, table: str) -> str:
    pattern = rf"(<!-- {marker} -->\n)(?:.*?\n)?(<!-- /{marker} -->)"
    new, n = re.subn(pattern, lambda m: m.group(1) + table + "\n" + m.group(2), page,
                     flags=re.S)
    if n != 1:
        raise SystemExit(f"{PAGE}: no <!-- {marker} --> block")
    return new


def main() -> int:
    page = open(PAGE).read()
    page = replace(page, "COLLECTIVES", collectives_table(run("meshes")))
    page = replace(page, "MEMORY", memory_table(run("memory")))
    open(PAGE, "w").write(page)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
