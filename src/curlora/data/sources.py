"""Readers for the paper's datasets: local files in their original formats, the
Hugging Face hub, and a user's own CSV / TSV / JSONL file.

Local readers exist so the experiment runs on machines without hub access, on
exactly the bytes users download themselves (see ``../shared/data/README.md``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .splits import DataError, Example

__all__ = [
    "HUB_IDS",
    "resolve_file",
    "read_mrpc",
    "read_sst2",
    "read_sentiment140",
    "read_wikitext_raw",
    "hub_load",
    "read_table",
    "read_text",
    "examples_from_rows",
    "BenchmarkDir",
    "benchmark_dir",
]

csv.field_size_limit(1 << 24)

#: Hub ids of the paper's datasets: (path, config name).
HUB_IDS: dict[str, tuple[str, str | None]] = {
    "mrpc": ("nyu-mll/glue", "mrpc"),
    "sst2": ("nyu-mll/glue", "sst2"),
    "sentiment140": ("stanfordnlp/sentiment140", None),
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
}


# --------------------------------------------------------------------------- local files


def read_text(path: str | Path) -> str:
    """A UTF-8 file's text (a leading BOM dropped); a file that is not UTF-8 is refused with the
    line and column of its first bad byte, so the user can find it."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise DataError(
            f"{path}, line {line}, column {column}: not UTF-8 text (byte 0x{data[start]:02x}); "
            f"re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def resolve_file(data_dir: str | Path | None, subdir: str, filename: str) -> Path:
    """Find ``data_dir/subdir/filename`` (or ``data_dir/filename``) or say what is missing."""
    if data_dir is None:
        raise DataError(
            f"source 'local' needs a data directory (data_dir / --data-dir) holding {subdir}/{filename}"
        )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory")
    for cand in (root / subdir / filename, root / filename):
        if cand.is_file():
            return cand
    raise DataError(f"missing file {root / subdir / filename} (looked also for {root / filename})")


def _tsv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    # read_text strips MRPC's BOM; QUOTE_NONE because MRPC/GLUE strings hold bare quotes
    rows = list(csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{path}: file is empty")
    return rows[0], [r for r in rows[1:] if r and any(c.strip() for c in r)]


def _label(path: Path, line: int, raw: str, mapping: dict[str, int]) -> int:
    try:
        return mapping[raw.strip()]
    except KeyError:
        raise DataError(
            f"{path}, line {line}: label {raw!r} is not in the task's label set {sorted(mapping)}"
        ) from None


def _column(path: Path, header: Sequence[str], name: str) -> int:
    cols = [h.strip() for h in header]
    if name not in cols:
        raise DataError(f"{path}: missing column {name!r} (header has {cols})")
    return cols.index(name)


def read_mrpc(path: str | Path) -> list[Example]:
    """MRPC original TSV (``Quality #1 ID #2 ID #1 String #2 String``) as sentence pairs."""
    path = Path(path)
    header, rows = _tsv_rows(path)
    q, s1, s2 = (_column(path, header, c) for c in ("Quality", "#1 String", "#2 String"))
    out = []
    for i, r in enumerate(rows, start=2):
        if len(r) <= max(q, s1, s2):
            raise DataError(f"{path}, line {i}: expected {len(header)} tab-separated fields, got {len(r)}")
        out.append(Example(r[s1], _label(path, i, r[q], {"0": 0, "1": 1}), r[s2]))
    return out


def read_sst2(path: str | Path) -> list[Example]:
    """GLUE SST-2 TSV (``sentence<TAB>label``); sentences kept lower-cased/tokenized as GLUE has them."""
    path = Path(path)
    header, rows = _tsv_rows(path)
    s, lab = _column(path, header, "sentence"), _column(path, header, "label")
    out = []
    for i, r in enumerate(rows, start=2):
        if len(r) <= max(s, lab):
            raise DataError(f"{path}, line {i}: expected {len(header)} tab-separated fields, got {len(r)}")
        out.append(Example(r[s], _label(path, i, r[lab], {"0": 0, "1": 1})))
    return out


SENTIMENT140_POLARITY = {"0": 0, "2": 1, "4": 2}


def read_sentiment140(path: str | Path) -> list[Example]:
    """Sentiment140 CSV without header; polarity 0/2/4 becomes label 0/1/2 (neg/neutral/pos).

    Accepts the original 6-field rows (``polarity,id,date,query,user,text``) and the
    2-field ``polarity,text`` form; the text is the last field, kept verbatim (HTML
    entities such as ``&amp;`` included, as in the hub dataset the paper used).
    """
    path = Path(path)
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    out = []
    for i, r in enumerate(rows, start=1):
        if len(r) not in (2, 6):
            raise DataError(
                f"{path}, line {i}: expected 6 fields (polarity,id,date,query,user,text) "
                f"or 2 (polarity,text), got {len(r)}"
            )
        out.append(Example(r[-1], _label(path, i, r[0], SENTIMENT140_POLARITY)))
    return out


def read_wikitext_raw(path: str | Path) -> str:
    """A raw WikiText file as one string with ``\\n`` line endings (headings kept)."""
    path = Path(path)
    text = read_text(path).replace("\r\n", "\n")
    if not text.strip():
        raise DataError(f"{path}: corpus file is empty")
    return text


# --------------------------------------------------------------------------- hub


def _load_dataset(*args: Any, **kwargs: Any) -> Any:  # indirection so tests can mock it
    import datasets

    return datasets.load_dataset(*args, **kwargs)


def hub_load(task: str, split: str) -> Any:
    """``datasets.load_dataset`` of a paper dataset, turning any failure into a DataError
    that tells the user how to run from local files instead."""
    path, config = HUB_IDS[task]
    try:
        return _load_dataset(path, config, split=split)
    except DataError:
        raise
    except Exception as exc:  # network, offline mode, missing script support, ...
        where = f"{path}" + (f" ({config})" if config else "")
        raise DataError(
            f"could not load {where} split {split!r} from the Hugging Face hub: "
            f"{type(exc).__name__}: {exc}. If the hub is unreachable, use local files: "
            f"pass --data-dir DIR (data_dir=DIR, source='local') with the dataset's original "
            f"files (see the data README), or use the offline suite (source='offline')."
        ) from exc


def hub_examples(task: str, split: str, text: str, label: str,
                 mapping: Callable[[Any], int] = int, text_pair: str | None = None) -> list[Example]:
    ds = hub_load(task, split)
    return [
        Example(row[text], mapping(row[label]), row[text_pair] if text_pair else None)
        for row in ds
    ]


# --------------------------------------------------------------------------- user files


def read_table(path: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows of a CSV, TSV (GLUE-style: no quoting), JSON-lines file, or a ``.json`` file holding one
    JSON list of objects (O-LoRA's benchmark files), as dicts.

    Returns (column names, rows); the row's line number is stored under ``"__line__"`` (a JSON list's
    item number, from 1, under ``"__item__"``: O-LoRA's files are one line).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"missing file {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        text = read_text(path)
        json_list = suffix == ".json" and text.lstrip().startswith("[")
        columns, rows = (_json_list if json_list else _json_lines)(path, text)
    elif suffix in (".csv", ".tsv", ".txt"):
        columns, rows = _delimited_rows(path, read_text(path), suffix)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv or .jsonl)")
    return columns, rows


def _json_lines(path: Path, text: str) -> tuple[list[str], list[dict[str, Any]]]:
    columns: list[str] = []
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {i}, column {exc.colno}: not valid JSON ({exc.msg})") from None
        except RecursionError:  # json nests by recursion: a line of 100,000 brackets
            raise DataError(f"{path}, line {i}: JSON nested too deep; a row is one flat object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {i}: expected a JSON object per line, got {type(obj).__name__}")
        columns += [k for k in obj if k not in columns]
        obj["__line__"] = i
        rows.append(obj)
    if not rows:
        raise DataError(f"{path}: file is empty (no JSON lines); put one JSON object per line")
    return columns, rows


def _json_list(path: Path, text: str) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})") from None
    except RecursionError:  # json nests by recursion: a file of 100,000 brackets
        raise DataError(f"{path}: JSON nested too deep; a list of flat objects is expected") from None
    columns: list[str] = []
    for i, obj in enumerate(items, start=1):
        if not isinstance(obj, dict):
            raise DataError(f"{path}, item {i}: expected a JSON object per list item, got {type(obj).__name__}")
        columns += [k for k in obj if k not in columns]
        obj["__item__"] = i
    if not items:
        raise DataError(f"{path}: the JSON list is empty; it needs labelled objects")
    return columns, items


def _delimited_rows(path: Path, text: str, suffix: str) -> tuple[list[str], list[dict[str, Any]]]:
    """CSV (quoted fields allowed) or TSV (GLUE-style, no quoting); every row must have the header's
    number of fields, since a stray delimiter silently shifts a text into the label."""
    kw: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix != ".csv" else {}
    reader = csv.reader(io.StringIO(text, newline=""), **kw)
    try:
        return _checked_rows(path, reader, suffix)
    except csv.Error as error:  # a field over csv.field_size_limit (16 MiB), a NUL, a stray quote
        raise DataError(f"{path}, line {reader.line_num}: {error}") from None


def _checked_rows(path: Path, reader: Any, suffix: str) -> tuple[list[str], list[dict[str, Any]]]:
    header = next((r for r in reader if any(c.strip() for c in r)), None)
    if header is None:
        raise DataError(f"{path}: file is empty; the first line must name the columns")
    header = [h.strip() for h in header]
    rows: list[dict[str, Any]] = []
    what = "comma" if suffix == ".csv" else "tab"
    for r in reader:
        if not r or not any(c.strip() for c in r):
            continue
        if len(r) != len(header):
            raise DataError(
                f"{path}, line {reader.line_num}: {len(r)} {what}-separated fields, but the header has "
                f"{len(header)} ({', '.join(header)}); "
                + ("quote fields that contain commas" if suffix == ".csv" else "remove the stray tabs")
            )
        row: dict[str, Any] = dict(zip(header, r))
        row["__line__"] = reader.line_num
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: only a header line ({', '.join(header)}), no data rows")
    return header, rows


def examples_from_rows(
    path: Path,
    columns: Sequence[str],
    rows: Sequence[dict[str, Any]],
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    label_names: Sequence[str] | None = None,
) -> tuple[list[Example], list[str]]:
    """Turn table rows into Examples and the label names.

    With ``label_names`` a label may be a name from the list or an integer index into
    it; without, the sorted distinct label values become the label names.
    """
    for col in (text_column, label_column, text_pair_column):
        if col is not None and col not in columns:
            raise DataError(f"{path}: missing column {col!r} (columns are {list(columns)})")

    def at(row: dict[str, Any]) -> str:
        return f"{path}, item {row['__item__']}" if "__item__" in row else f"{path}, line {row['__line__']}"

    def raw_label(row: dict[str, Any]) -> str:
        v = row.get(label_column)
        if v is None or (isinstance(v, str) and not v.strip()):
            raise DataError(f"{at(row)}: empty label in column {label_column!r}")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise DataError(f"{at(row)}: label {v!r} is not a string or integer")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        return str(v).strip()

    raws = [raw_label(r) for r in rows]
    if label_names is None:
        distinct = sorted(set(raws), key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))
        if len(distinct) < 2:
            raise DataError(f"{path}: column {label_column!r} has fewer than 2 distinct labels {distinct}")
        names = distinct
        mapping = {s: i for i, s in enumerate(names)}
    else:
        names = [str(n) for n in label_names]
        mapping = {s: i for i, s in enumerate(names)}
        if not any(n.lstrip("-").isdigit() for n in names):  # indices are unambiguous
            for i in range(len(names)):
                mapping.setdefault(str(i), i)

    out = []
    for row, raw in zip(rows, raws):
        if raw not in mapping:
            raise DataError(f"{at(row)}: label {raw!r} is not in the task's label set {names}")
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{at(row)}: empty or non-text value in column {text_column!r}")
        pair = None
        if text_pair_column is not None:
            pair = row.get(text_pair_column)
            if not isinstance(pair, str) or not pair.strip():
                raise DataError(f"{at(row)}: empty or non-text value in column {text_pair_column!r}")
        out.append(Example(text, mapping[raw], pair))
    return out, names


# --------------------------------------------------------------------------- O-LoRA's benchmark files


@dataclass(frozen=True)
class BenchmarkDir:
    """One dataset of O-LoRA's ``CL_Benchmark`` (cmnfriend/O-LoRA): ``train.json`` and ``test.json``, each
    a JSON list of ``{"label": ..., "sentence": ...}``, and ``labels.json`` listing the label strings.
    Its ``dev.json`` is never read: in that repository it is the test file again."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def train(self) -> Path:
        return self.root / "train.json"

    @property
    def test(self) -> Path:
        return self.root / "test.json"

    @property
    def dev(self) -> Path:
        return self.root / "dev.json"

    def label_names(self) -> list[str]:
        """labels.json's strings, in order: the task's classes and its answer words."""
        path = self.root / "labels.json"
        try:
            names = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})") from None
        if (not isinstance(names, list) or len(names) < 2
                or not all(isinstance(n, str) and n.strip() for n in names) or len(set(names)) != len(names)):
            raise DataError(f"{path}: expected a JSON list of at least 2 distinct label strings, got {names!r:.200}")
        return names

    def dev_note(self) -> str | None:
        """What the task's notes say of dev.json: it is never used, and why when it is the test file."""
        if not self.dev.is_file():
            return None
        if self.test.is_file() and self.dev.read_bytes() == self.test.read_bytes():
            return ("dev.json is byte-identical to test.json, so it is not used: validation for choosing rates "
                    "is carved from train.json's rows")
        return "dev.json is not used: validation for choosing rates is carved from train.json's rows"


def benchmark_dir(path: str | Path) -> BenchmarkDir | None:
    """The O-LoRA dataset that ``path`` names (its directory, or the ``train.json`` in it, with a
    ``labels.json`` beside), or None for any other file."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "labels.json").is_file():
            raise DataError(f"{p} is a directory but not one of O-LoRA's datasets (no labels.json in it); "
                            f"point path at a CSV / TSV / JSON(L) file or at such a dataset directory")
        return BenchmarkDir(p)
    if p.suffix == ".json" and (p.parent / "labels.json").is_file():
        if p.name in ("test.json", "dev.json"):  # dev.json is test.json again in O-LoRA's repository
            raise DataError(f"{p} holds O-LoRA's test rows, which are never trained or selected on; point path "
                            f"at its directory (or its train.json)")
        if p.name == "train.json":
            return BenchmarkDir(p.parent)
    return None
