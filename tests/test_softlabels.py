"""Soft labels: parsing a teacher's answer and rebuilding a label distribution from OpenAI-shaped logprobs."""

from __future__ import annotations

import math

import pytest

from gateway.softlabels import LabelSet, label_distribution, non_label_mass, parse_label

LABELS = ["credit_limit", "credit_limit_change", "credit_score", "balance", "time", "timer", "timezone"]


def tok(token: str, prob: float, alternatives: dict[str, float] | None = None) -> dict:
    """One entry of choices[0].logprobs.content as OpenAI returns it."""
    alts = alternatives if alternatives is not None else {token: prob}
    return {
        "token": token,
        "logprob": math.log(prob),
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": t, "logprob": math.log(p), "bytes": list(t.encode())}
            for t, p in sorted(alts.items(), key=lambda kv: -kv[1])
        ],
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("credit_score", "credit_score"),
        ("  Credit_Score.\n", "credit_score"),
        ('"balance"', "balance"),
        ("`timer`", "timer"),
        ("**Balance**.", "balance"),
        ("I'm sorry, I can't help with that request.", None),
        ("credit", None),
        ("credit score", None),
        ("", None),
    ],
)
def test_parse_label(text, expected):
    assert parse_label(text, LABELS) == expected
    assert LabelSet(LABELS).parse(text) == expected


def test_labels_equal_after_normalisation_are_refused():
    with pytest.raises(ValueError, match="same after normalisation"):
        LabelSet(["Yes", "yes."])


def test_prefix_lookup():
    labels = LabelSet(LABELS)
    assert labels.with_prefix("credit_limit") == ["credit_limit", "credit_limit_change"]
    assert labels.with_prefix("tim") == ["time", "timer", "timezone"]
    assert labels.with_prefix("zzz") == []


def test_multi_token_label_follows_the_generated_path():
    # Answer "credit_limit_change"; first-token alternatives "credit" .8, "balance" .1, "I" .1.
    content = [
        tok("credit", 0.8, {"credit": 0.8, "balance": 0.1, "I": 0.1}),
        tok("_limit", 0.75, {"_limit": 0.75, "_score": 0.25}),
        tok("_change", 0.6, {"_change": 0.6, ".": 0.4}),
    ]
    dist = label_distribution(content, LABELS)
    assert dist is not None
    # The 0.1 of "I" opens a sentence, not a label: it is spread evenly over the seven labels.
    even = 0.1 / len(LABELS)
    assert dist["balance"] == pytest.approx(0.1 + even)
    assert dist["credit_score"] == pytest.approx(0.8 * 0.25 + even)
    # After "credit_limit" the "." alternative is the probability of stopping at the complete label.
    assert dist["credit_limit"] == pytest.approx(0.8 * 0.75 * 0.4 + even)
    assert dist["credit_limit_change"] == pytest.approx(0.8 * 0.75 * 0.6 + even)
    assert dist["timer"] == pytest.approx(even)
    assert sum(dist.values()) == pytest.approx(1.0)
    assert max(dist, key=dist.__getitem__) == "credit_limit_change"
    assert non_label_mass(content, LABELS) == pytest.approx(0.1)


def test_path_ending_at_a_complete_label_gives_it_the_rest():
    content = [
        tok("credit", 0.7, {"credit": 0.7, "balance": 0.3}),
        tok("_limit", 0.9, {"_limit": 0.9, "_score": 0.1}),
    ]
    dist = label_distribution(content, LABELS)
    assert dist == pytest.approx({"credit_limit": 0.63, "credit_score": 0.07, "balance": 0.3})


def test_off_path_first_tokens_split_evenly_and_longest_alternative_wins():
    # "time" answered; "timer" is its own alternative, so "time" speaks only for "time" and "timer" only for
    # "timer"; "credit" (off the path) splits evenly over the three credit labels; "tim" is a partial token
    # whose labels all belong to longer alternatives, so its mass is shared among them.
    content = [tok("time", 0.5, {"time": 0.5, "timer": 0.2, "credit": 0.15, "tim": 0.15})]
    dist = label_distribution(content, LABELS)
    assert dist is not None
    assert dist["time"] == pytest.approx(0.5 + 0.15 / 3)
    assert dist["timer"] == pytest.approx(0.2 + 0.15 / 3)
    assert dist["timezone"] == pytest.approx(0.15 / 3)
    for label in ("credit_limit", "credit_limit_change", "credit_score"):
        assert dist[label] == pytest.approx(0.05)


def test_quotes_case_and_leading_space_are_ignored_and_equal_tokens_merge():
    content = [
        tok('"', 0.99, {'"': 0.99}),
        tok("Balance", 0.6, {"Balance": 0.6, " balance": 0.2, "credit": 0.2}),
        tok('"', 0.99),
    ]
    dist = label_distribution(content, LABELS)
    assert dist is not None
    assert dist["balance"] == pytest.approx(0.8)
    assert dist["credit_score"] == pytest.approx(0.2 / 3)


def test_a_decline_keeps_the_label_alternatives_and_reports_its_mass():
    content = [
        tok("I", 0.9, {"I": 0.9, "balance": 0.06, "Sorry": 0.04}),
        tok("'m", 0.99),
        tok(" sorry", 0.99),
    ]
    assert parse_label("I'm sorry", LABELS) is None
    assert label_distribution(content, LABELS) == pytest.approx({"balance": 1.0})
    assert non_label_mass(content, LABELS) == pytest.approx(0.94)


def test_a_capital_letter_opening_a_decline_is_not_read_as_the_labels_it_starts():
    # The teacher answers "balance" but leans 0.2 towards "I'm sorry": with labels starting with "i", that 0.2
    # must stay the inclination to decline, not become mass on "income" and "insurance".
    labels = [*LABELS, "income", "insurance"]
    content = [tok("balance", 0.7, {"balance": 0.7, "I": 0.2, "credit": 0.1})]
    dist = label_distribution(content, labels)
    even = 0.2 / len(labels)  # spread over every label, as doubt, not given to the two that start with "i"
    assert dist is not None and dist["income"] == pytest.approx(even) == dist["timer"]
    assert dist["balance"] == pytest.approx(0.7 + even)
    assert non_label_mass(content, labels) == pytest.approx(0.2)
    # A label's own first token still claims it.
    spelled = [tok("balance", 0.7, {"balance": 0.7, "income": 0.2, "I": 0.1})]
    spread = {label: 0.1 / len(labels) for label in labels}
    assert label_distribution(spelled, labels) == pytest.approx(
        {**spread, "balance": 0.7 + spread["balance"], "income": 0.2 + spread["income"]}
    )
    # A label configured with that capital ("IT_support") makes "I" a label start again.
    it = [tok("balance", 0.7, {"balance": 0.7, "I": 0.3})]
    assert label_distribution(it, [*labels, "IT_support"]) == pytest.approx(
        {"balance": 0.7, "income": 0.1, "insurance": 0.1, "IT_support": 0.1}
    )


@pytest.mark.parametrize(
    ("labels", "content", "expected"),
    [
        # Lower-case letters and digits are label pieces as before (a tokenizer may split "w2" or "20").
        (["w2", "balance"], [tok("balance", 0.6, {"balance": 0.6, "w": 0.4})], {"balance": 0.6, "w2": 0.4}),
        (["10", "20"], [tok("2", 0.55, {"2": 0.55, "1": 0.45}), tok("0", 0.99)], {"20": 0.55, "10": 0.45}),
        # Other scripts too: one character per token.
        (
            ["退款", "余额"],
            [tok("退", 0.6, {"退": 0.6, "余": 0.35}), tok("款", 0.99)],
            {"退款": 0.6 / 0.95, "余额": 0.35 / 0.95},
        ),
        # One-letter labels: the capitals are those labels, not sentence openers.
        (["a", "b", "c", "d"], [tok("A", 0.7, {"A": 0.7, "B": 0.2, "C": 0.1})], {"a": 0.7, "b": 0.2, "c": 0.1}),
        # The generated token follows its path, even a capital that opens a label ("I" + "ncome").
        (
            ["income", "balance"],
            [tok("I", 0.6, {"I": 0.6, "balance": 0.4}), tok("ncome", 0.99)],
            {"income": 0.6, "balance": 0.4},
        ),
        # The generated one-letter token follows its path.
        (["w2", "balance"], [tok("w", 0.6, {"w": 0.6, "balance": 0.4}), tok("2", 0.99)], {"w2": 0.6, "balance": 0.4}),
    ],
)
def test_one_character_tokens_that_are_not_sentence_openers_still_claim_labels(labels, content, expected):
    assert label_distribution(content, labels) == pytest.approx(expected)


def test_missing_logprobs_give_none():
    assert label_distribution(None, LABELS) is None
    assert label_distribution([], LABELS) is None
    assert non_label_mass([], LABELS) is None
    # Only non-label alternatives: nothing to distribute.
    assert label_distribution([tok("Hello", 0.9, {"Hello": 0.9, "Hi": 0.1})], LABELS) is None


def test_logprobs_without_top_logprobs_fall_back_to_the_path():
    content = [
        {"token": "credit", "logprob": math.log(0.9), "top_logprobs": []},
        {"token": "_score", "logprob": math.log(0.8), "top_logprobs": []},
    ]
    assert label_distribution(content, LABELS) == pytest.approx({"credit_score": 1.0})
