"""Synthetic teacher logs from a labelled dataset, for distill tests and the distill speed benchmark.

Each in-scope example becomes an InferenceRecord whose teacher label is the dataset label and whose label
distribution looks like a teacher's top-20 logprobs (most mass on the label, the rest spread over a few other
labels); an out-of-scope example becomes a decline (a text outside the label set, teacher_label None).
`perturb` rewrites texts with fillers and word drops so that many more unique inputs than the dataset holds
can be made (dedupe would otherwise collapse repeats).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from gateway.inference_log import InferenceRecord

DECLINE_TEXT = "I'm sorry, but I can't help with that request."
_PREFIXES = ("", "", "", "hey ", "please ", "hi, ", "quick question: ", "ok so ", "um ", "hello, ", "yo ")
_SUFFIXES = ("", "", "", " please", " thanks", " asap", " now", " today", " for me", "?", " thank you")


def _perturb(text: str, rng: random.Random) -> str:
    words = text.split()
    if len(words) > 3 and rng.random() < 0.5:
        del words[rng.randrange(len(words))]
    return f"{rng.choice(_PREFIXES)}{' '.join(words)}{rng.choice(_SUFFIXES)}"


def _distribution(label: str, labels: Sequence[str], rng: random.Random, top: int) -> dict[str, float]:
    p_label = rng.uniform(0.55, 0.995)
    others = rng.sample([x for x in labels if x != label], k=min(top - 1, len(labels) - 1))
    weights = [rng.expovariate(1.0) for _ in others]
    total = sum(weights) or 1.0
    rest = 1.0 - p_label
    dist = {label: p_label}
    dist.update({o: rest * w / total for o, w in zip(others, weights, strict=True)})
    return dist


def synthetic_records(
    examples: Sequence[tuple[str, str]],
    labels: Sequence[str],
    *,
    task: str,
    n: int | None = None,
    seed: int = 0,
    oos_label: str = "oos",
    perturb: bool = False,
    soft: bool = True,
    top: int = 20,
    start_time: float = 1_700_000_000.0,
    step_s: float = 1.0,
) -> list[InferenceRecord]:
    """`n` records (default: one per example, in order) from (text, label) pairs; label `oos_label` declines.

    With `perturb`, examples are drawn at random and rewritten; otherwise they cycle in order."""
    rng = random.Random(seed)
    count = len(examples) if n is None else n
    label_set = set(labels)
    out = []
    for i in range(count):
        text, label = rng.choice(examples) if perturb else examples[i % len(examples)]
        if perturb:
            text = _perturb(text, rng)
        in_scope = label != oos_label and label in label_set
        out.append(
            InferenceRecord(
                task=task,
                route="teacher",
                reason="no_specialist",
                input_text=text,
                teacher_model="synthetic-teacher",
                teacher_text=label if in_scope else DECLINE_TEXT,
                teacher_label=label if in_scope else None,
                label_distribution=(_distribution(label, labels, rng, top) if in_scope and soft else None),
                request={"model": task, "messages": [{"role": "user", "content": text}]},
                response=None,
                status=200,
                latency_ms=100.0,
                prompt_tokens=len(text.split()) + 40,
                completion_tokens=3,
                created_at=start_time + i * step_s,
            )
        )
    return out
