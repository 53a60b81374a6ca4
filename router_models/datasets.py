"""Labelled text datasets for the reference teacher and the benchmarks: CLINC150 JSON and a generic JSONL.

Two formats, detected from the file's content:
- CLINC150 (clinc/oos-eval): one JSON object, split name -> list of [text, label]; splits train/val/test and
  oos_train/oos_val/oos_test, the out-of-scope label is "oos".
- JSONL: one object per line, {"text": str, "label": str, "split": "train"|"val"|"test"}; label "oos" marks an
  out-of-distribution example.
Both load into a `Dataset` with the splits train/val/test, each mixing in-scope and out-of-scope examples.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

OOS_LABEL = "oos"
SPLITS: tuple[str, ...] = ("train", "val", "test")
CLINC150_URL = "https://raw.githubusercontent.com/clinc/oos-eval/master/data/data_full.json"
CLINC150_SHA256 = "36923c3705a59e08fe9c3883d8bc2dd966ef93e22cb78ac41171782a698d56e0"
CLINC150_FILENAME = "data_full.json"

# CLINC150's split names -> ours; the oos_* splits hold the out-of-scope examples of the same split.
_CLINC_SPLITS = {
    "train": "train",
    "val": "val",
    "test": "test",
    "oos_train": "train",
    "oos_val": "val",
    "oos_test": "test",
}


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or malformed; the message names the file and the place."""


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled input. `label == "oos"` marks an out-of-scope (out-of-distribution) input."""

    text: str
    label: str
    split: str

    @property
    def is_oos(self) -> bool:
        return self.label == OOS_LABEL


@dataclass(frozen=True)
class Dataset:
    """Examples per split (train/val/test) plus the sorted in-scope label list (never containing "oos")."""

    name: str
    path: Path
    format: Literal["clinc150", "jsonl"]
    sha256: str
    splits: dict[str, list[Example]]
    labels: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return self.splits.get(name, [])

    def in_scope(self, split: str) -> list[Example]:
        return [e for e in self.split(split) if not e.is_oos]

    def out_of_scope(self, split: str) -> list[Example]:
        return [e for e in self.split(split) if e.is_oos]

    def __iter__(self) -> Iterator[Example]:
        for name in SPLITS:
            yield from self.split(name)

    def summary(self) -> dict[str, Any]:
        """Counts per split, for logs and benchmark reports."""
        return {
            "name": self.name,
            "format": self.format,
            "sha256": self.sha256,
            "labels": len(self.labels),
            **{s: {"in_scope": len(self.in_scope(s)), "oos": len(self.out_of_scope(s))} for s in SPLITS},
        }


def load_dataset(path: Path | str) -> Dataset:
    """Loads a CLINC150 JSON or a JSONL dataset, detecting the format from the content."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    sha = hashlib.sha256(raw).hexdigest()
    if _looks_like_clinc(text):
        examples = _parse_clinc(text, path)
        fmt: Literal["clinc150", "jsonl"] = "clinc150"
    else:
        examples = _parse_jsonl(text, path)
        fmt = "jsonl"
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for ex in examples:
        splits[ex.split].append(ex)
    labels = sorted({e.label for e in examples if not e.is_oos})
    if not any(not e.is_oos for e in splits["train"]):
        raise DatasetError(f"{path}: the train split has no in-scope examples")
    return Dataset(name=path.stem, path=path, format=fmt, sha256=sha, splits=splits, labels=labels)


def _looks_like_clinc(text: str) -> bool:
    """True for one JSON object whose values are lists (CLINC150); a JSONL line's values are strings."""
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return False
    try:
        obj = json.loads(stripped)
    except json.JSONDecodeError:
        return False  # several objects (JSONL) or broken JSON: the JSONL parser reports the line
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, list) for v in obj.values())


def _parse_clinc(text: str, path: Path) -> list[Example]:
    obj = json.loads(text)
    unknown = sorted(set(obj) - set(_CLINC_SPLITS))
    if unknown:
        raise DatasetError(
            f"{path}: unknown CLINC150 split(s) {', '.join(map(repr, unknown))}; expected {', '.join(_CLINC_SPLITS)}"
        )
    out: list[Example] = []
    for key, rows in obj.items():
        split = _CLINC_SPLITS[key]
        for i, row in enumerate(rows):
            where = f"{path}: split {key!r} item {i}"
            if not (isinstance(row, list) and len(row) == 2 and all(isinstance(v, str) for v in row)):
                raise DatasetError(f"{where}: expected [text, label] (two strings), got {row!r:.80}")
            text_, label = row
            if key.startswith("oos_") and label != OOS_LABEL:
                raise DatasetError(f"{where}: split {key!r} must hold label 'oos', got {label!r}")
            out.append(_example(text_, label, split, where))
    return out


def _parse_jsonl(text: str, path: Path) -> list[Example]:
    out: list[Example] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise DatasetError(f'{where}: expected an object {{"text", "label", "split"}}, got {obj!r:.80}')
        missing = [k for k in ("text", "label", "split") if k not in obj]
        if missing:
            raise DatasetError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
        for key in ("text", "label", "split"):
            if not isinstance(obj[key], str):
                raise DatasetError(f"{where}: {key!r} must be a string, got {obj[key]!r:.80}")
        if obj["split"] not in SPLITS:
            raise DatasetError(f"{where}: split {obj['split']!r} is not one of {', '.join(SPLITS)}")
        out.append(_example(obj["text"], obj["label"], obj["split"], where))
    if not out:
        raise DatasetError(f"{path}: no examples (empty file?)")
    return out


def _example(text: str, label: str, split: str, where: str) -> Example:
    if not text.strip():
        raise DatasetError(f"{where}: empty text")
    if not label.strip() or label != label.strip():
        raise DatasetError(f"{where}: label {label!r} is empty or has surrounding whitespace")
    return Example(text=text, label=label, split=split)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_clinc150(
    dest: Path | str, *, url: str = CLINC150_URL, sha256: str = CLINC150_SHA256, timeout_s: float = 60.0
) -> Path:
    """The path of CLINC150's data_full.json: an existing copy under `dest`, else downloaded there.

    `dest` may be the file itself, a folder holding data_full.json, or a data folder like ../shared/data
    holding clinc150/data_full.json. A download goes to <dest>/clinc150/data_full.json through a temporary
    file and is kept only if its sha256 matches, so a broken or tampered download never lands.
    """
    dest = Path(dest)
    for candidate in (dest, dest / CLINC150_FILENAME, dest / "clinc150" / CLINC150_FILENAME):
        if candidate.is_file():
            actual = file_sha256(candidate)
            if actual != sha256:
                raise DatasetError(f"{candidate}: sha256 {actual} does not match CLINC150 data_full.json ({sha256})")
            return candidate
    target = dest / "clinc150" / CLINC150_FILENAME
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".download-", suffix=".json")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as resp:
            for block in iter(lambda: resp.read(1 << 16), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != sha256:
            raise DatasetError(f"download from {url} has sha256 {digest.hexdigest()}, expected {sha256}; not kept")
        os.replace(tmp, target)
    except OSError as exc:
        raise DatasetError(f"cannot download CLINC150 from {url}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target
