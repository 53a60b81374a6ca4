"""`run_distill` with the MiniLM student: a token-input version with its tokenizer, loadable by the gateway."""

from __future__ import annotations

import json
import random
from pathlib import Path

from gateway.manifest import Manifest
from gateway.settings import RegistryConfig, Settings, TaskConfig
from gateway.specialist import Specialist
from router_models.distill import DistillConfig, run_distill
from router_models.synthetic import synthetic_records

CLINC = Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150" / "data_full.json"


def test_minilm_distill_promotes_a_token_input_version(tmp_path):
    data = json.loads(CLINC.read_text())
    labels = sorted({label for _, label in data["train"]})[:6]
    rows = [(t, lab) for t, lab in data["train"] if lab in labels][::3]  # 34 per label
    rows += [(t, "oos") for t, _ in data["oos_train"][:30]]
    random.Random(1).shuffle(rows)
    records = synthetic_records(rows, labels, task="intent", seed=2)
    settings = Settings(
        tasks={"intent": TaskConfig(name="intent", teacher="t", labels=labels, target_agreement=0.95)},
        registry=RegistryConfig(path=tmp_path / "registry"),
    )
    outcome = run_distill(
        settings, "intent", since_s=None, dry_run=False, student="minilm", records=records, progress=False,
        config=DistillConfig(parity_sample=40),
    )  # fmt: skip
    assert outcome.promoted
    vdir = outcome.report_dir
    assert vdir is not None and (vdir / "tokenizer.json").is_file()
    manifest = Manifest.model_validate_json((vdir / "manifest.json").read_text())
    assert manifest.student == "minilm" and manifest.input.kind == "tokens"
    assert outcome.metrics["parity_max_abs_diff"] < 1e-4
    specialist = Specialist.load(vdir, task="intent", labels=labels)
    decisions = [specialist.decide(t, top_k=0) for t, lab in rows[:40] if lab != "oos"]
    assert sum(
        d.label == lab for d, (_, lab) in zip(decisions, [r for r in rows[:40] if r[1] != "oos"], strict=True)
    ) > 0.8 * len(decisions)
