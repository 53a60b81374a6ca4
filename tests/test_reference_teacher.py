"""The reference teacher: traffic split, decoding, cache, and the real server in OpenAI's shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import openai
import pytest

from gateway import OFFLINE_ENV
from gateway.softlabels import LabelSet, label_distribution, non_label_mass
from router_models.datasets import load_dataset
from router_models.reference_teacher import (
    DECLINE_TEXT,
    MODEL_ID,
    ReferenceTeacher,
    TeacherConfig,
    build_reference_teacher,
    label_tokens,
    split_teacher_traffic,
    traffic_examples,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_CLINC = ROOT / ".." / "shared" / "data" / "clinc150" / "data_full.json"
LABELS = [
    "balance", "bill_due", "credit_limit", "credit_limit_change", "credit_score",
    "timer", "time", "weather", "translate", "pto_request",
]  # fmt: skip
pytestmark = pytest.mark.skipif(not SHARED_CLINC.is_file(), reason="../shared/data not present")


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """10 CLINC150 intents (all their train/val/test rows) plus the oos rows of val and test, as JSONL."""
    raw = json.loads(SHARED_CLINC.read_text())
    rows = []
    for key, split in (("train", "train"), ("val", "val"), ("test", "test"), ("oos_val", "val")):
        rows += [
            {"text": t, "label": lab, "split": split} for t, lab in raw[key] if lab in LABELS or key.startswith("oos")
        ]
    rows += [{"text": t, "label": lab, "split": "test"} for t, lab in raw["oos_test"][:50]]
    path = tmp_path_factory.mktemp("data") / "clinc10.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def teacher_url(small_dataset, cache_dir, tmp_path_factory):
    env = {**os.environ, **OFFLINE_ENV}
    cmd = [sys.executable, "-m", "router_models.reference_teacher_server", "--data", str(small_dataset),
           "--port", "0", "--cache-dir", str(cache_dir), "--latency-ms", "5"]  # fmt: skip
    # stderr to a file: a pipe nobody drains could fill up and stall the server.
    stderr_path = tmp_path_factory.mktemp("logs") / "teacher.stderr"
    stderr = stderr_path.open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("READY "):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(180):
            proc.kill()
            pytest.fail(f"reference teacher did not start: {''.join(lines)} {stderr_path.read_text()}")
        url = next(line for line in lines if line.startswith("READY ")).split()[1]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
        stderr.close()


@pytest.fixture(scope="module")
def client(teacher_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{teacher_url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_label_tokens_keep_the_underscore_with_the_next_piece():
    assert label_tokens("credit_limit_change") == ["credit", "_limit", "_change"]
    assert label_tokens("balance") == ["balance"]
    assert label_tokens("a__b_") == ["a", "__b", "_"]
    assert "".join(label_tokens("what is_this")) == "what is_this"


def test_traffic_split_is_disjoint_deterministic_and_per_label(small_dataset):
    ds = load_dataset(small_dataset)
    teacher, traffic = split_teacher_traffic(ds, seed=3, teacher_fraction=0.3)
    train = ds.split("train")
    assert sorted(teacher + traffic) == list(range(len(train)))
    assert (teacher, traffic) == split_teacher_traffic(ds, seed=3, teacher_fraction=0.3)
    assert teacher != split_teacher_traffic(ds, seed=4, teacher_fraction=0.3)[0]
    per_label = defaultdict(int)
    for i in teacher:
        per_label[train[i].label] += 1
    assert dict(per_label) == {label: 30 for label in LABELS}  # 100 train rows per CLINC150 intent
    assert [e.text for e in traffic_examples(ds, 3)] == [train[i].text for i in traffic]


def _toy_teacher() -> ReferenceTeacher:
    labels = ["balance", "credit_limit", "credit_limit_change", "credit_score"]
    z = np.zeros((len(labels), 4), dtype=np.float32)
    return ReferenceTeacher(
        labels=labels, coef=z, intercept=z[:, 0], anchors=z, threshold=1.0, scale=0.05,
        dataset_sha256="0" * 64, seed=0, config=TeacherConfig(),
    )  # fmt: skip


def test_greedy_decoding_over_label_tokens():
    teacher = _toy_teacher()
    # "balance" is the most likely label but "credit" is the most likely first token (.25+.2+.2): greedy
    # decoding, like an LLM's, follows "credit", then "_limit" (.45 of .65), then stops at "credit_limit"
    # (.25) rather than continuing to "_change" (.2).
    answer = teacher.decode(np.array([0.35, 0.25, 0.2, 0.2]), confidence=2.0)
    assert answer.label == answer.text == "credit_limit"
    assert [t.token for t in answer.tokens] == ["credit", "_limit"]
    first = answer.tokens[0]
    assert first.prob == pytest.approx(0.65, abs=1e-3) and first.alternatives[1][0] == "balance"
    assert answer.tokens[1].prob == pytest.approx(0.45 / 0.65)
    # The soft label read back from these tokens puts "balance" at its probability.
    content = [
        {
            "token": t.token,
            "logprob": np.log(t.prob),
            "top_logprobs": [{"token": a, "logprob": np.log(p)} for a, p in t.alternatives],
        }
        for t in answer.tokens
    ]
    dist = label_distribution(content, teacher.labels)
    assert dist["balance"] == pytest.approx(0.35, abs=1e-3)
    assert dist["credit_score"] == pytest.approx(0.2, abs=1e-3)


def test_low_confidence_declines_outside_the_label_set():
    teacher = _toy_teacher()
    answer = teacher.decode(np.array([0.7, 0.1, 0.1, 0.1]), confidence=0.5)
    assert answer.label is None and answer.text == DECLINE_TEXT
    assert "".join(t.token for t in answer.tokens) == DECLINE_TEXT
    assert answer.tokens[0].token == "I" and answer.tokens[0].prob > 0.99


def test_server_models_and_non_streaming_answers(client, small_dataset):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    ds = load_dataset(small_dataset)
    labels = LabelSet(ds.labels)
    tests = ds.in_scope("test")[::15]
    correct = 0
    for ex in tests:
        r = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "system", "content": "Answer with one label: " + ", ".join(ds.labels)},
                      {"role": "user", "content": ex.text}],
            logprobs=True, top_logprobs=20,
        )  # fmt: skip
        assert r.model == MODEL_ID and r.object == "chat.completion"
        content = r.choices[0].message.content
        assert content in ds.labels or content == DECLINE_TEXT
        correct += content == ex.label
        tokens = r.choices[0].logprobs.content
        assert "".join(t.token for t in tokens) == content
        assert 1 <= len(tokens[0].top_logprobs) <= 20
        assert r.usage.completion_tokens == len(tokens)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.usage.prompt_tokens >= len(ex.text) // 4 + 8
        if content in ds.labels:
            dist = label_distribution([t.model_dump() for t in tokens], labels)
            assert max(dist, key=dist.__getitem__) == content and dist[content] > 0.5
    assert correct / len(tests) >= 0.85


def test_multi_token_label_logprobs(client):
    r = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "can you raise the limit on my credit card"}],
        logprobs=True, top_logprobs=5,
    )  # fmt: skip
    assert r.choices[0].message.content == "credit_limit_change"
    tokens = r.choices[0].logprobs.content
    assert [t.token for t in tokens] == ["credit", "_limit", "_change"]
    assert all(t.logprob <= 0 for t in tokens) and len(tokens[0].top_logprobs) == 5
    # Position 2 lists the continuations after "credit": "_limit" and "_score".
    assert {a.token for a in tokens[1].top_logprobs} == {"_limit", "_score"}


def test_off_topic_input_gets_a_decline(client):
    r = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "write a sonnet about medieval castles and dragons"}],
        logprobs=True, top_logprobs=20,
    )  # fmt: skip
    assert r.choices[0].message.content == DECLINE_TEXT
    content = [t.model_dump() for t in r.choices[0].logprobs.content]
    assert non_label_mass(content, LABELS) > 0.5


def test_no_logprobs_unless_asked_and_max_tokens(client):
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "what is my balance"}])
    assert r.choices[0].logprobs is None and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "increase my credit limit please"}], max_tokens=1
    )
    assert r.choices[0].message.content == "credit" and r.choices[0].finish_reason == "length"


def test_streaming_with_logprobs_and_usage(client):
    stream = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "can you raise the limit on my credit card"}],
        stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "credit_limit_change"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == ["credit", "_limit", "_change"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_bad_requests_get_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="any", messages=[])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="The 'top_logprobs' parameter is only allowed when 'logprobs' is"):
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], top_logprobs=3)


def test_trained_head_is_cached_by_dataset_and_seed(teacher_url, small_dataset, cache_dir):
    class NoEncoder:
        def encode(self, texts):
            raise AssertionError("the cache should have answered")

    ds = load_dataset(small_dataset)
    start = time.perf_counter()
    teacher = build_reference_teacher(ds, 0, cache_dir=cache_dir, encoder=NoEncoder(), log=False)
    assert time.perf_counter() - start < 2.0
    assert sorted(teacher.labels) == sorted(LABELS) and teacher.metrics["val_oos_recall"] >= 0.85
    with pytest.raises(AssertionError, match="cache should have answered"):
        build_reference_teacher(ds, 1, cache_dir=cache_dir, encoder=NoEncoder(), log=False)


def test_a_port_in_use_fails_at_once_in_one_line_before_any_training(small_dataset, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "router_models.cli", "reference-teacher", "--data", str(small_dataset),
               "--port", str(port)]  # fmt: skip
        # From an empty directory: the teacher's cache (.apprentice/cache, relative) is empty there, so a bind
        # that came after the training would have printed the training's "embedding ..." line first.
        env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "Traceback" not in proc.stderr
    assert "embedding" not in proc.stderr
