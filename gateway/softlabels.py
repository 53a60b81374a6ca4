"""The teacher's label from its text, and its label distribution (the soft label) from its logprobs.

An LLM answers a classification task with text: `parse_label` accepts it only when, after trimming
whitespace, quotes, markdown emphasis, case and a trailing period, it is exactly one of the task's labels;
anything else (a refusal, an explanation, an unknown label) is None, a decline.

`label_distribution` reads an OpenAI chat completion's `choices[0].logprobs.content`. A label is often several
tokens ("credit_limit_change" -> "credit", "_limit", "_change"), and OpenAI only reports alternatives per
position, so the distribution is rebuilt from the first label token's `top_logprobs`:
- every alternative first token claims the labels whose text starts with it; a label is claimed by the longest
  such alternative (when "timer" is itself an alternative, "time" speaks only for "time", not for "timer");
- the mass of the generated first token is split among its labels by following the generated path: at each
  later position the alternatives give the conditional split between the labels still consistent with it;
  an alternative that continues no label while a label is already complete (".", a newline) is the
  probability of stopping there. Mass of alternatives off the generated path is split evenly;
- an alternative that is a lone capital letter, which no label starts with as configured and which is not
  itself a label ("I" of "I'm sorry"), opens a sentence, not a label: read as the first piece of a label it
  would hand the teacher's inclination to decline to the labels starting with its lower-case letter. Its mass
  is spread evenly over all the labels instead, so the answer is that much less certain without favouring any
  label (a distribution without that doubt made the student surer of the inputs the teacher nearly declined:
  README), and `non_label_mass` counts it;
- the result is renormalised over the labels. The share of first-token mass that matches no label (the
  teacher's inclination to decline or to say something else) is reported by `non_label_mass`.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

LogprobsContent = Sequence[Mapping[str, Any]]

# Characters an LLM wraps a bare answer in; trimmed from both ends of the answer before matching.
_WRAPPERS = " \t\r\n\"'`*"
# What may trail a complete label inside a token ("_change." or "_change\n").
_TRAILERS = _WRAPPERS + "."


def normalise_answer(text: str) -> str:
    """Lower-case text without surrounding whitespace, quotes, emphasis and trailing periods."""
    previous = None
    out = text
    while out != previous:
        previous = out
        out = out.strip(_WRAPPERS).rstrip(".")
    return out.lower()


class LabelSet:
    """A task's labels with their normalised forms precomputed, for parsing and prefix lookups."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels: tuple[str, ...] = tuple(labels)
        self._by_norm: dict[str, str] = {}
        for label in self.labels:
            norm = normalise_answer(label)
            if not norm:
                raise ValueError(f"label {label!r} is empty after normalisation")
            if norm in self._by_norm:
                raise ValueError(f"labels {self._by_norm[norm]!r} and {label!r} are the same after normalisation")
            self._by_norm[norm] = label
        self._sorted: list[str] = sorted(self._by_norm)
        # The labels' first characters as configured, after the wrappers an answer may carry (`_first_key`).
        self.initials: frozenset[str] = frozenset(label.lstrip(_WRAPPERS)[:1] for label in self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def parse(self, text: str) -> str | None:
        """The label `text` names exactly (after normalisation), else None."""
        return self._by_norm.get(normalise_answer(text))

    def label_of(self, norm: str) -> str | None:
        """The label whose normalised form is `norm`."""
        return self._by_norm.get(norm)

    def with_prefix(self, prefix: str) -> list[str]:
        """Normalised labels starting with the normalised `prefix` (contiguous in sorted order)."""
        lo = bisect.bisect_left(self._sorted, prefix)
        hi = bisect.bisect_left(self._sorted, prefix + "\U0010ffff")
        return self._sorted[lo:hi]


def _as_label_set(labels: Sequence[str] | LabelSet) -> LabelSet:
    return labels if isinstance(labels, LabelSet) else LabelSet(labels)


def parse_label(text: str, labels: Sequence[str] | LabelSet) -> str | None:
    """The label the answer names, or None for a decline or an answer outside the label set."""
    return _as_label_set(labels).parse(text)


def label_distribution(
    logprobs_content: LogprobsContent | None, labels: Sequence[str] | LabelSet
) -> dict[str, float] | None:
    """Probabilities over the labels (summing to 1, labels without mass omitted), or None when unknown.

    None when there are no logprobs or no alternative of the first answer token starts any label.
    """
    masses = _first_token_masses(logprobs_content, _as_label_set(labels))
    if masses is None:
        return None
    by_label, _, _ = masses
    total = sum(by_label.values())
    if total <= 0.0:
        return None
    return {label: mass / total for label, mass in by_label.items() if mass > 0.0}


def non_label_mass(logprobs_content: LogprobsContent | None, labels: Sequence[str] | LabelSet) -> float | None:
    """Share of the listed first-token probability that starts no label (0 = surely a label), or None."""
    masses = _first_token_masses(logprobs_content, _as_label_set(labels))
    if masses is None:
        return None
    _, other, listed = masses
    return other / listed if listed > 0.0 else None


def _first_token_masses(
    content: LogprobsContent | None, labels: LabelSet
) -> tuple[dict[str, float], float, float] | None:
    """(mass per label, mass matching no label, listed mass) at the first non-blank answer token."""
    if not content:
        return None
    start = next((k for k, tok in enumerate(content) if _norm_first(_token(tok))), None)
    if start is None:
        return None
    alternatives = [(a, p) for a, p in _alternatives(content[start], first=True, labels=labels) if a]
    claims = _claims([a for a, _ in alternatives], "", set(labels.with_prefix("")), labels)
    generated = _norm_first(_token(content[start]))  # the answer's own token follows its path, whatever it is
    by_label: dict[str, float] = defaultdict(float)
    other = 0.0
    opening = 0.0  # mass of sentence openers (`_first_key`): spread evenly over the labels below
    for alt, prob in alternatives:
        claimed = claims.get(alt, [])
        if not claimed:
            other += prob
            if _is_opener(alt):
                opening += prob
            continue
        shares = (
            _path_shares(content, start, alt, set(claimed), labels)
            if alt == generated
            else {norm: 1.0 / len(claimed) for norm in claimed}
        )
        for norm, share in shares.items():
            by_label[norm] += prob * share
    if opening > 0.0 and by_label:
        for norm in labels.with_prefix(""):
            by_label[norm] += opening / len(labels)
    listed = sum(prob for _, prob in alternatives)
    named = {labels.label_of(norm) or norm: mass for norm, mass in by_label.items()}
    return named, other, listed


def _path_shares(
    content: LogprobsContent, start: int, prefix: str, candidates: set[str], labels: LabelSet
) -> dict[str, float]:
    """How the generated first token's mass divides among `candidates`, read along the generated path."""
    shares: dict[str, float] = defaultdict(float)
    remaining = 1.0
    for k in range(start + 1, len(content)):
        complete = _complete(prefix, candidates)
        alternatives = [(a, p) for a, p in _alternatives(content[k], first=False) if a]
        claims = _claims([a for a, _ in alternatives], prefix, candidates, labels)
        end_mass = sum(p for a, p in alternatives if not claims.get(a) and complete is not None)
        z = sum(p for a, p in alternatives if claims.get(a)) + end_mass
        generated = _token(content[k]).lower()
        if z <= 0.0:
            break
        for alt, prob in alternatives:
            claimed = claims.get(alt, [])
            if claimed and alt != generated:
                for norm in claimed:
                    shares[norm] += remaining * prob / z / len(claimed)
        if complete is not None:
            shares[complete] += remaining * end_mass / z
        if not claims.get(generated):
            # The answer stopped here (a period, a newline) or left the label space: the alternatives above
            # (and the stop, when a label was complete) have taken all of the remaining mass.
            remaining = 0.0
            break
        remaining *= dict(alternatives)[generated] / z
        prefix += generated
        candidates = set(claims[generated])
    if remaining > 0.0:
        complete = _complete(prefix, candidates)
        if complete is not None:
            shares[complete] += remaining
        else:
            for norm in candidates:
                shares[norm] += remaining / len(candidates)
    return shares


def _claims(alternatives: list[str], prefix: str, candidates: set[str], labels: LabelSet) -> dict[str, list[str]]:
    """The candidate labels each alternative continues; a label goes to the longest alternative that fits."""
    matches: dict[str, list[str]] = {}
    for alt in alternatives:
        extended = prefix + alt
        found = [norm for norm in labels.with_prefix(extended) if norm in candidates]
        if not found:
            exact = extended.rstrip(_TRAILERS)
            if len(exact) > len(prefix) and exact in candidates:
                found = [exact]
        matches[alt] = found
    owner: dict[str, str] = {}
    for alt, found in matches.items():
        for norm in found:
            if norm not in owner or len(alt) > len(owner[norm]):
                owner[norm] = alt
    claims: dict[str, list[str]] = {}
    for alt, found in matches.items():
        own = [norm for norm in found if owner[norm] == alt]
        # A short alternative whose labels all went to longer ones still carries mass: keep it on them.
        claims[alt] = own or found
    return claims


def _complete(prefix: str, candidates: set[str]) -> str | None:
    """The candidate label the prefix already spells out completely, if any."""
    for form in (prefix, prefix.rstrip(_TRAILERS)):
        if form in candidates:
            return form
    return None


def _alternatives(entry: Mapping[str, Any], *, first: bool, labels: LabelSet | None = None) -> list[tuple[str, float]]:
    """(normalised token, probability) at one position, the generated token included, equal tokens merged.
    At the first position the alternatives to the generated token are keyed by `_first_key`."""
    generated = _token(entry)

    def norm(token: str) -> str:
        if not first:
            return token.lower()
        return _norm_first(token) if token == generated or labels is None else _first_key(token, labels)

    raw: dict[str, float] = {}
    for alt in entry.get("top_logprobs") or []:
        raw[_token(alt)] = _prob(alt)
    raw.setdefault(_token(entry), _prob(entry))
    merged: dict[str, float] = defaultdict(float)
    for token, prob in raw.items():
        merged[norm(token)] += prob
    return list(merged.items())


def _first_key(token: str, labels: LabelSet) -> str:
    """An alternative first token as it is compared with the labels: `_norm_first`, except a lone capital letter
    that no label starts with as configured and that is not itself a label ("I" of "I'm sorry", "A" of "A
    refund..."), kept as it is. That is a word opening a sentence, not the first piece of "income" or "account":
    it claims no label of its own, and `_first_token_masses` spreads its mass over all the labels. Lower-case
    letters, digits and other scripts are compared as before."""
    stripped = token.lstrip(_WRAPPERS)
    if _is_opener(stripped) and stripped not in labels.initials and labels.label_of(stripped.lower()) is None:
        return stripped
    return stripped.lower()


def _is_opener(key: str) -> bool:
    """A lone capital letter: the shape of a sentence opener, and of the only keys `_first_key` keeps apart."""
    return len(key) == 1 and "A" <= key <= "Z"


def _norm_first(token: str) -> str:
    return token.lstrip(_WRAPPERS).lower()


def _token(entry: Mapping[str, Any]) -> str:
    token = entry.get("token")
    return token if isinstance(token, str) else ""


def _prob(entry: Mapping[str, Any]) -> float:
    logprob = entry.get("logprob")
    if not isinstance(logprob, int | float) or math.isnan(logprob):
        return 0.0
    return math.exp(min(float(logprob), 0.0))
