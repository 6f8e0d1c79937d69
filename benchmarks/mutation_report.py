"""Summarise a mutmut run (benchmarks/mutation.sh) per module: killed / survived / not run, and the
diff of every survivor, into benchmarks/results/mutation/ (scores.md and survivors.md).

Run from the repository root after benchmarks/mutation.sh, with the venv's python."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

OUT = Path("benchmarks/results/mutation")
MUTMUT = str(Path(sys.executable).with_name("mutmut"))


def main() -> None:
    listing = subprocess.run([MUTMUT, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    status = {}
    for line in listing.splitlines():
        match = re.match(r"\s*(\S+): (.+)$", line)
        if match:
            status[match.group(1)] = match.group(2).strip()
    by_module: dict[str, Counter] = defaultdict(Counter)
    for name, verdict in status.items():
        module = name.split(".x")[0] if ".x" in name else name
        by_module[module][verdict] += 1
    rows = ["| module | mutants | killed | timeout | survived | no tests | not run | score (killed+timeout of run) |",
            "|---|---|---|---|---|---|---|---|"]
    total = Counter()
    for module in sorted(by_module):
        c = by_module[module]
        total.update(c)
        rows.append(_row(module, c))
    rows.append(_row("**all**", total))
    (OUT / "scores.md").write_text("\n".join(rows) + "\n")
    survivors = [n for n, v in status.items() if v in ("survived", "no tests")]
    parts = []
    for name in survivors:
        diff = subprocess.run([MUTMUT, "show", name], capture_output=True, text=True).stdout
        changed = [line for line in diff.splitlines() if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))]
        parts.append(f"### {name} ({status[name]})\n```diff\n" + "\n".join(changed) + "\n```\n")
    (OUT / "survivors.md").write_text("# Surviving mutants (diffs)\n\n" + "\n".join(parts))
    print("\n".join(rows))


def _row(module: str, c: Counter) -> str:
    run = c["killed"] + c["timeout"] + c["survived"] + c["no tests"]
    score = (c["killed"] + c["timeout"]) / run if run else float("nan")
    return (f"| {module} | {sum(c.values())} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['no tests']} | "
            f"{c['not checked']} | {100 * score:.1f} % |")


if __name__ == "__main__":
    main()
