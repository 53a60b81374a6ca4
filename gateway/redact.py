"""Optional redaction of e-mail addresses, phone numbers and payment card numbers before a record is logged.

It errs towards removing too much: any run of 7 to 15 digits (separators allowed) that is not a date or a
time reads as a phone number, because a number lost from a training log costs little and a leaked one
costs a lot. A run of 13 to 19 digits is a card only if it passes the Luhn check. The input hash is
recomputed from the redacted text, so distill dedupes on what it can see and the raw value cannot be
recovered by hashing guesses.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from gateway.inference_log import InferenceRecord

EMAIL_TOKEN = "[EMAIL]"
PHONE_TOKEN = "[PHONE]"
CARD_TOKEN = "[CARD]"

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 13 to 19 digits, optionally grouped by single spaces or dashes, not glued to other digits.
_CARD = re.compile(r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)")
# An optional +country code, an optional (area) code, then 7 to 14 digits with single separators.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d(?:[\s.-]?\d){6,13}(?!\w)")
_DATE_OR_TIME = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}|\d{1,2}:\d{2}(?::\d{2})?")
# Structural fields of OpenAI requests and responses: never personal data, and redacting them would
# corrupt the record (a completion id is a long run of digits and letters).
_STRUCTURAL_KEYS = frozenset({"id", "object", "model", "role", "type", "finish_reason", "system_fingerprint"})


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return CARD_TOKEN if luhn_valid(digits) else match.group(0)


def _phone(match: re.Match[str]) -> str:
    text = match.group(0)
    if _DATE_OR_TIME.fullmatch(text.strip()):
        return text
    digits = sum(char.isdigit() for char in text)
    return PHONE_TOKEN if 7 <= digits <= 15 else text


def redact_text(text: str) -> str:
    """`text` with e-mails, Luhn-valid card numbers and phone numbers replaced by [EMAIL], [CARD], [PHONE]."""
    if not any(char.isdigit() or char == "@" for char in text):
        return text  # the common case (no digits, no @) costs one scan
    text = _EMAIL.sub(EMAIL_TOKEN, text)
    text = _CARD.sub(_card, text)
    return _PHONE.sub(_phone, text)


def redact_json(value: Any) -> Any:
    """A copy of a JSON value with every string redacted, except OpenAI's structural fields."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: item if key in _STRUCTURAL_KEYS else redact_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_json(item) for item in value]
    return value


def redact_record(record: InferenceRecord) -> InferenceRecord:
    """The record with its input, teacher text, request and response redacted and the input hash recomputed."""
    return dataclasses.replace(
        record,
        input_text=redact_text(record.input_text),
        teacher_text=redact_text(record.teacher_text),
        request=redact_json(record.request),
        response=None if record.response is None else redact_json(record.response),
        input_sha256="",  # __post_init__ hashes the redacted input
    )
