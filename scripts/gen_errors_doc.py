"""Write (or --check) the table of bad data inputs in docs/errors.md by running each one.

Every case runs ``fedft simulate simulations/quickstart.toml --set ...`` in this process, in
a scratch folder holding the case's data file, and records the exit code and what fedft
printed on stderr. ``tests/test_data_check.py`` runs the same cases through ``fedft
simulate``, ``fedft server``, ``fedft compare`` and ``fedft privacy plan`` and checks that
the table in docs/errors.md is what this script writes, so the table stays true.

    python scripts/gen_errors_doc.py          # rewrite the table
    python scripts/gen_errors_doc.py --check  # exit 1 if docs/errors.md is stale
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"
CONFIG = ROOT / "simulations" / "quickstart.toml"
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"


def _rows(header: str, *rows: str) -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode()


_TEN = [f"review number {i},{'pos' if i % 2 else 'neg'}" for i in range(10)]
_QA = [f'{{"text": "question {i}?", "label": "answer {i}"}}' for i in range(10)]


@dataclass(frozen=True)
class Case:
    """One bad input: what it is, the overrides, and the file it needs (name, bytes)."""

    what: str
    overrides: tuple[str, ...]
    files: dict[str, bytes] = field(default_factory=dict)


CASES: tuple[Case, ...] = (
    Case("a dataset name that does not exist", ("data.dataset=nope",)),
    Case("a data file that does not exist", ("data.dataset=missing.csv",)),
    Case("a file that is not .csv or .jsonl", ("data.dataset=reviews.txt",)),
    Case(
        "a CSV file that is not UTF-8 (Latin-1)",
        ("data.dataset=latin1.csv",),
        {"latin1.csv": b"text,label\ncaf\xe9 cr\xe8me,pos\nbad,neg\n"},
    ),
    Case(
        "a CSV row with an unquoted comma (more fields than the header)",
        ("data.dataset=commas.csv",),
        {"commas.csv": _rows("text,label", "fine film,pos", "long, dull film,neg")},
    ),
    Case(
        "a JSONL line that is not JSON",
        ("data.dataset=broken.jsonl",),
        {"broken.jsonl": b'{"text": "ok", "label": "pos"}\n{"text": "no closing brace"\n'},
    ),
    Case(
        "a JSONL line that is a list, not an object",
        ("data.dataset=list.jsonl",),
        {"list.jsonl": b'["good film", "pos"]\n'},
    ),
    Case(
        "a CSV file with a header and no rows",
        ("data.dataset=empty.csv",),
        {"empty.csv": b"text,label\n"},
    ),
    Case(
        "no text column",
        ("data.dataset=cols.csv",),
        {"cols.csv": _rows("review,label", "good,pos", "bad,neg")},
    ),
    Case(
        "a row with empty text",
        ("data.dataset=blank.csv",),
        {"blank.csv": _rows("text,label", "good,pos", " ,neg")},
    ),
    Case(
        "labels that are real numbers",
        ("data.dataset=scores.jsonl",),
        {"scores.jsonl": b'{"text": "good", "label": 0.9}\n{"text": "bad", "label": 0.1}\n'},
    ),
    Case(
        "a label column with one class",
        ("data.dataset=one.csv",),
        {"one.csv": _rows("text,label", *[f"review {i},pos" for i in range(10)])},
    ),
    Case(
        "causal LM: a file without an answer column",
        ("data.dataset=prompts.jsonl", "model.task=causal_lm", "model.name=smollm2-135m"),
        {"prompts.jsonl": b'{"text": "What is 2 + 2?"}\n{"text": "Name a colour."}\n'},
    ),
    Case(
        "causal LM: an empty answer",
        ("data.dataset=qa.jsonl", "model.task=causal_lm", "model.name=smollm2-135m"),
        {"qa.jsonl": b'{"text": "What is 2 + 2?", "label": "4"}\n{"text": "Hi", "label": ""}\n'},
    ),
    Case("model.task = causal_lm on rotten_tomatoes", ("model.task=causal_lm",)),
    Case(
        "model.task = classification on chatterbot",
        ("data.dataset=chatterbot", "data.partition=iid"),
    ),
    Case("a test split larger than the data", ("data.test_size=20000",)),
    Case(
        "a public split larger than what is left",
        ("data.test_size=12000", "data.public_size=900"),
    ),
    Case(
        "natural partition with more clients than groups (600 clients, 508 movies)",
        ("data.partition=natural", "federation.num_clients=600"),
    ),
    Case(
        "natural partition of a file without a group column",
        (
            "data.dataset=ten.csv",
            "data.partition=natural",
            "data.test_size=2",
            "data.public_size=0",
        ),
        {"ten.csv": _rows("text,label", *_TEN)},
    ),
    Case(
        "iid partition that leaves clients empty (8 rows, 10 clients)",
        ("data.dataset=ten.csv", "data.partition=iid", "data.test_size=2", "data.public_size=0"),
        {"ten.csv": _rows("text,label", *_TEN)},
    ),
    Case(
        "dirichlet partition with fewer than 2 examples per client",
        ("data.dataset=ten.csv", "data.test_size=2", "data.public_size=0"),
        {"ten.csv": _rows("text,label", *_TEN)},
    ),
)


@contextlib.contextmanager
def _scratch(case: Case) -> Iterator[Path]:
    """A temporary working folder holding the case's files (paths in messages stay short)."""
    old = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="fedft-bad-input-") as tmp:
        for name, data in case.files.items():
            (Path(tmp) / name).write_bytes(data)
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


def command(case: Case, sub: Sequence[str] = ("simulate",)) -> list[str]:
    """The fedft argv of one case for the subcommand ``sub``."""
    argv = [*sub, str(CONFIG)]
    for o in case.overrides:
        argv += ["--set", o]
    if list(sub) == ["server"]:
        argv.append("--insecure")
    return argv


def run_case(case: Case, sub: Sequence[str] = ("simulate",)) -> tuple[int, str]:
    """Run one case through ``fedft <sub>`` in this process: (exit code, stderr)."""
    from fedft.cli import main

    err = io.StringIO()
    with _scratch(case), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(command(case, sub))
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    return code, "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def render() -> str:
    """The table between the markers: one row per case, as it prints today."""
    out = [
        BEGIN,
        "| # | what was tried | overrides (`--set`) | exit | what fedft prints (stderr) |",
        "|---|---|---|---|---|",
    ]
    for i, case in enumerate(CASES, start=1):
        code, err = run_case(case)
        sets = "<br>".join(f"`{o}`" for o in case.overrides)
        out.append(f"| {i} | {_cell(case.what)} | {sets} | {code} | {_cell(err)} |")
    out.append(END)
    return "\n".join(out)


def updated(doc: str, table: str) -> str:
    """``doc`` with the text between the markers replaced by ``table``."""
    start, stop = doc.index(BEGIN), doc.index(END) + len(END)
    return doc[:start] + table + doc[stop:]


def main(argv: Sequence[str]) -> int:
    """Rewrite docs/errors.md's table, or with --check report whether it is current."""
    doc = DOC.read_text(encoding="utf-8")
    new = updated(doc, render())
    if "--check" in argv:
        if new != doc:
            print(f"{DOC} is stale: run python scripts/gen_errors_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    print(f"wrote {len(CASES)} cases to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
