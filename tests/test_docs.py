"""The docs a user reads are checked like code: every relative link and anchor in README.md and
docs/*.md resolves, every Markdown table has one column count on every row (a row that lost its
indent breaks a table when rendered), every ``curlora ...`` command in a code block parses with the
current CLI, every YAML example (but a Kubernetes manifest) holds real config fields, docs/cli.md
is what tools/cli_docs.py writes from the parser, and every result table is what
tools/results_tables.py writes from the committed results.json files."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from curlora.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]`]|`[^`]*`)*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def prose(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks; inline code blanked out unless not wanted
    (a heading's anchor keeps the words of its inline code)."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, re.sub(r"`[^`]*`", lambda m: " " * len(m.group()), line) if blank_code else line))
    return out


def code_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, line) inside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
        elif fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose(page.read_text(encoding="utf-8"), blank_code=False):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_and_anchor_resolves(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for number, line in prose(text):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"line {number}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"line {number}: {target} (no heading with anchor #{anchor})")
    assert not broken, f"{page_id(page)}: " + "; ".join(broken)


def cells(row: str) -> int:
    body = row.strip().strip("|")
    return len(re.split(r"(?<!\\)\|", body))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_table_row_has_the_header_column_count_and_indent(page):
    bad, table = [], []
    for number, line in [*prose(page.read_text(encoding="utf-8")), (0, "")]:
        if line.lstrip().startswith("|"):
            table.append((number, line))
            continue
        if table:
            (first, header), rest = table[0], table[1:]
            indent = len(header) - len(header.lstrip())
            for number_, row in rest:
                if cells(row) != cells(header) or len(row) - len(row.lstrip()) != indent:
                    bad.append(f"line {number_}: {cells(row)} cells at indent {len(row) - len(row.lstrip())}, "
                               f"the header at line {first} has {cells(header)} at indent {indent}")
            table = []
    assert not bad, f"{page_id(page)}: " + "; ".join(bad)


def commands(page: Path) -> list[tuple[int, list[str]]]:
    """Every ``curlora ...`` command line in the page's code blocks, continuation lines joined."""
    found, pending, start = [], "", 0
    for number, line in code_blocks(page.read_text(encoding="utf-8")):
        line = re.sub(r"\s+#.*$", "", line.strip())
        if not pending:
            line = re.sub(r"^\$\s+", "", line)
            if not line.startswith("curlora "):
                continue
            start = number
        pending += " " + line.rstrip("\\")
        if not line.endswith("\\"):
            found.append((start, shlex.split(pending)[1:]))
            pending = ""
    return found


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_curlora_command_in_the_docs_parses(page, capsys):
    parser = build_parser()
    for number, argv in commands(page):
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page_id(page)}, line {number}: `curlora {' '.join(argv)}` does not parse: "
                        f"{capsys.readouterr().err.strip()}")


def yaml_blocks(page: Path) -> list[tuple[int, str]]:
    """(first line number, text) of every ```yaml block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        if current is None and re.match(r"^\s*```ya?ml\s*$", line):
            current, start = [], number + 1
        elif current is not None and FENCE.match(line):
            blocks.append((start, "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_yaml_example_uses_real_settings_and_task_file_keys(page):
    import yaml

    from curlora.continual.config import ContinualConfig
    from curlora.continual.config_checks import TASK_FILE_KEYS

    fields = set(ContinualConfig.__dataclass_fields__)
    for start, text in yaml_blocks(page):
        settings = yaml.safe_load(text)
        if {"apiVersion", "kind"} <= set(settings):  # a Kubernetes manifest (docs/distributed.md), not a config
            continue
        where = f"{page_id(page)}, the YAML block at line {start}"
        assert set(settings) <= fields, f"{where}: not config fields: {sorted(set(settings) - fields)}"
        for entry in settings.get("task_files", []):
            assert set(entry) <= set(TASK_FILE_KEYS), f"{where}: not task-file keys: {sorted(set(entry) - set(TASK_FILE_KEYS))}"
        rates = [r for grid in (settings.get("method_lrs") or {}).values() for r in grid]
        assert all(isinstance(r, float) for r in rates), f"{where}: a rate YAML reads as a string: {rates}"


def test_the_readme_stays_short_and_shows_its_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) <= 12 * 1024
    assert "make run" in readme and "make test" in readme  # CI runs the README's test command
    assert commands(ROOT / "README.md"), "the README shows the benchmark's commands"


def test_make_run_runs_each_method_at_the_rate_the_heads_frontier_chose():
    """The quick-verdict preset (what `make run` runs) takes its rates from the committed evidence: a
    frontier rerun that chose another rate fails here until the preset follows it."""
    import json

    from curlora.continual.config import load_config

    assert "--preset quick-verdict" in (ROOT / "Makefile").read_text(encoding="utf-8")
    preset = load_config("quick-verdict")
    frontier = json.loads((ROOT / "docs" / "results" / "frontier" / "results.json").read_text(encoding="utf-8"))
    chosen = {c["method"]: c["lr"] for c in frontier["frontier"]["selection"] if c["rank"] in (None, *preset.ranks)}
    assert preset.method_lrs == {method: [chosen[method]] for method in preset.method_lrs}
    assert set(preset.methods) - set(preset.method_lrs) == {"head"}  # the floor, which takes no rate


def test_the_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "tools" / "cli_docs.py")
    cli_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_docs)
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == cli_docs.render(), (
        "docs/cli.md is stale: run `PYTHONPATH=src python tools/cli_docs.py`")


def _results_tables():
    """tools/results_tables.py as a module (registered, as its dataclasses need)."""
    if "results_tables" not in sys.modules:
        spec = importlib.util.spec_from_file_location("results_tables", ROOT / "tools" / "results_tables.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["results_tables"] = module
        spec.loader.exec_module(module)
    return sys.modules["results_tables"]


@pytest.mark.parametrize("path", ["README.md", "docs/results.md", "docs/choosing.md"])
def test_the_result_tables_are_what_the_results_files_give(path):
    tool = _results_tables()
    text = (ROOT / path).read_text(encoding="utf-8")
    assert not tool.missing(path, text), f"{path}: result-table markers missing or doubled: {tool.missing(path, text)}"
    assert text == tool.render(path, text), (
        f"{path}: a result table differs from the committed results files: run `PYTHONPATH=src python "
        "tools/results_tables.py` (never edit a generated table by hand)")


def test_a_hand_edited_result_table_fails_the_check():
    tool = _results_tables()
    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    start = tool.START.search(text)
    table = text[start.end():text.index(tool.END, start.end())]
    number = re.search(r"\d\.\d{3}", table)
    edited = text[:start.end() + number.start()] + "9.999" + text[start.end() + number.end():]
    assert edited != text and tool.render("docs/results.md", edited) == text  # the tool restores it


def test_every_results_file_the_docs_read_is_committed_and_listed():
    tool = _results_tables()
    for name in tool.EXPERIMENTS:
        assert (ROOT / "docs" / "results" / name / "results.json").is_file(), name
    listed = (ROOT / "docs" / "results" / "README.md").read_text(encoding="utf-8")
    assert all(f"[{name}]({name}/report.md)" in listed for name in tool.EXPERIMENTS)


def test_the_orders_table_reads_each_task_order_on_its_own(tmp_path, monkeypatch):
    """Issue 41's question, whether the verdict holds in every task order, read from the committed
    frontier's runs relabelled as three orders, LoRA's forgetting raised in one: each order's row
    says what it holds, the line under the table counts the orders, then says what pooling resolves
    and what counting each seed once does."""
    import copy
    import json

    tool = _results_tables()
    frontier = json.loads((ROOT / "docs" / "results" / "frontier" / "results.json").read_text(encoding="utf-8"))
    chosen = {("curlora", 1e-2), ("lora", 3e-3), ("o-lora", 3e-3), ("multitask", 3e-3)}
    runs = []
    for order, sequence in (("listed", [0, 1, 2]), ("second-first", [1, 2, 0]), ("last-first", [2, 0, 1])):
        for run in frontier["runs"]:
            if (run["method"], run.get("lr")) in chosen:
                run = {**copy.deepcopy(run), "order": order, "task_order": sequence}
                if order == "last-first" and run["method"] == "lora":  # LoRA forgets its first task entirely
                    run["accuracy_matrix"][-1][0] = 0.0
                runs.append(run)
    (tmp_path / "orders").mkdir()
    (tmp_path / "orders" / "results.json").write_text(json.dumps({**frontier, "runs": runs}), encoding="utf-8")
    monkeypatch.setattr(tool, "RESULTS", tmp_path)
    monkeypatch.setitem(tool.EXPERIMENTS, "orders", tool.Experiment("orders", "SmolLM2-135M-Instruct", "offline suite"))
    tool.load.cache_clear()
    try:
        table = tool.table_orders("orders")
    finally:
        tool.load.cache_clear()
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| listed (rotten_tomatoes → vader_tweets → bbc_news)", "| second-first (vader_tweets → bbc_news → rotten_tomatoes)",
        "| last-first (bbc_news → rotten_tomatoes → vader_tweets)"]
    assert "0.588 [0.540, 0.636] / 0.640 [0.592, 0.688] | +0.060 / +0.036" in rows[0]  # the frontier's own figures
    assert "| o-lora r16 +0.022 [-0.088, 0.132] |" in rows[1]
    assert "| ACC: LoRA's lower; forgetting: CURLoRA's lower |" in rows[2]  # what resolves in that order
    assert table.split(" Pooled")[0].endswith("In 2 of 3 orders CURLoRA's mean ACC is below LoRA's, in 2 of 3 its mean forgetting above "
                          "LoRA's; the method told no task identity that forgot least: o-lora in every order.")
    # Copies of one seed's run in three orders are not three samples: pooled, the report's intervals
    # resolve what the seeds alone (the frontier's three) do not.
    pooled, per_seed = table.split(" Pooled")[1].split(" With each seed's mean")
    assert "perplexity increase: o-lora r16 below CURLoRA r16 (+3.40 [3.12, 3.69] / +34.26 [12.97, 55.55])" in pooled
    assert per_seed.endswith("resolved: none.")
