"""Dataset loading: CLINC150 JSON and JSONL, format detection, clear errors, the checked CLINC150 download."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from router_models.datasets import DatasetError, ensure_clinc150, load_dataset

SHARED_CLINC = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "clinc150" / "data_full.json"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"text": "what is my balance", "label": "balance", "split": "train"},
    {"text": "raise my credit limit", "label": "credit_limit_change", "split": "train"},
    {"text": "who won the game last night", "label": "oos", "split": "train"},
    {"text": "how much money do i have", "label": "balance", "split": "val"},
    {"text": "tell me a poem", "label": "oos", "split": "val"},
    {"text": "can my card limit go up", "label": "credit_limit_change", "split": "test"},
]


def test_jsonl_loads_with_splits_oos_and_sorted_labels(tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "tiny.jsonl", ROWS))
    assert ds.format == "jsonl"
    assert ds.labels == ["balance", "credit_limit_change"]
    assert [e.text for e in ds.split("train")] == [r["text"] for r in ROWS[:3]]
    assert [e.is_oos for e in ds.split("train")] == [False, False, True]
    assert [e.text for e in ds.out_of_scope("val")] == ["tell me a poem"]
    assert len(ds.in_scope("test")) == 1 and ds.out_of_scope("test") == []
    assert ds.sha256 == hashlib.sha256((tmp_path / "tiny.jsonl").read_bytes()).hexdigest()
    assert ds.summary()["train"] == {"in_scope": 2, "oos": 1}


def test_a_single_line_jsonl_is_not_mistaken_for_clinc(tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "one.txt", ROWS[:1]))
    assert ds.format == "jsonl" and ds.labels == ["balance"]


def test_clinc150_format_maps_oos_splits(tmp_path):
    path = tmp_path / "mini_clinc.json"
    path.write_text(
        json.dumps(
            {
                "train": [["what is my balance", "balance"], ["set a timer", "timer"]],
                "val": [["balance please", "balance"]],
                "test": [["timer for 5 minutes", "timer"]],
                "oos_train": [["who is the president", "oos"]],
                "oos_val": [["sing a song", "oos"]],
                "oos_test": [["what is love", "oos"], ["tell a joke", "oos"]],
            }
        )
    )
    ds = load_dataset(path)
    assert ds.format == "clinc150"
    assert ds.labels == ["balance", "timer"]
    assert [e.label for e in ds.split("train")] == ["balance", "timer", "oos"]
    assert len(ds.out_of_scope("test")) == 2 and all(e.split == "test" for e in ds.split("test"))


@pytest.mark.skipif(not SHARED_CLINC.is_file(), reason="../shared/data not present")
def test_real_clinc150_loads():
    ds = load_dataset(SHARED_CLINC)
    assert len(ds.labels) == 150 and "oos" not in ds.labels
    assert (len(ds.in_scope("train")), len(ds.out_of_scope("train"))) == (15000, 100)
    assert (len(ds.in_scope("test")), len(ds.out_of_scope("test"))) == (4500, 1000)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([json.dumps(ROWS[0]), "{not json"], r"bad\.jsonl:2: not valid JSON"),
        ([json.dumps(ROWS[0]), "", json.dumps({"text": "x", "label": "y"})], r":3: missing key\(s\) 'split'"),
        ([json.dumps({**ROWS[0], "split": "dev"})], r":1: split 'dev' is not one of train, val, test"),
        ([json.dumps({**ROWS[0], "label": 3})], r":1: 'label' must be a string"),
        ([json.dumps(ROWS[0]), "[1, 2]"], r":2: expected an object"),
        ([json.dumps({**ROWS[0], "text": "  "})], r":1: empty text"),
        ([json.dumps({**ROWS[0], "split": "test"})], r"the train split has no in-scope examples"),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_dataset(path)


def test_bad_clinc_and_missing_files(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": [["a", "b"]], "dev": [["c", "d"]]}))
    with pytest.raises(DatasetError, match="unknown CLINC150 split"):
        load_dataset(path)
    path.write_text(json.dumps({"train": [["a", "b", "c"]]}))
    with pytest.raises(DatasetError, match=r"split 'train' item 0: expected \[text, label\]"):
        load_dataset(path)
    with pytest.raises(DatasetError, match="cannot read dataset"):
        load_dataset(tmp_path / "nope.jsonl")


def test_ensure_clinc150_checks_the_sha_of_a_download(tmp_path):
    source = tmp_path / "served.json"
    source.write_bytes(b'{"train": [["hi", "greeting"]]}')
    good = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = tmp_path / "data"

    with pytest.raises(DatasetError, match=r"sha256 .* expected 0+; not kept"):
        ensure_clinc150(dest, url=source.as_uri(), sha256="0" * 64)
    assert list((dest / "clinc150").iterdir()) == []  # the temporary file is gone too

    got = ensure_clinc150(dest, url=source.as_uri(), sha256=good)
    assert got == dest / "clinc150" / "data_full.json" and got.read_bytes() == source.read_bytes()
    # A second call finds the copy (no download: the URL is now unreachable) and still checks it.
    assert ensure_clinc150(dest, url="file:///nonexistent", sha256=good) == got
    with pytest.raises(DatasetError, match="does not match"):
        ensure_clinc150(dest, sha256="1" * 64)


def test_ensure_clinc150_reports_a_failed_download(tmp_path):
    with pytest.raises(DatasetError, match="cannot download CLINC150"):
        ensure_clinc150(tmp_path, url=(tmp_path / "missing.json").as_uri())


@pytest.mark.skipif(not SHARED_CLINC.is_file(), reason="../shared/data not present")
def test_ensure_clinc150_uses_the_shared_data_folder():
    assert ensure_clinc150(SHARED_CLINC.parents[1]).resolve() == SHARED_CLINC.resolve()
