"""OpenAI's own spec (cut to /chat/completions and /models, error responses added, the SSE schema opened) run by
schemathesis against the gateway in --upstream mode before the fake upstream: no server errors, and status
codes, content types and response bodies as the spec declares them. Bounded: a few dozen examples per operation.
"""

from __future__ import annotations

import json
from typing import Any

import hypothesis
import pytest
import schemathesis
from conftest import SPEC_PATH, Stack
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

if not SPEC_PATH.is_file():
    pytest.skip(f"the OpenAI spec is not at {SPEC_PATH}", allow_module_level=True)


def _with_discriminator_mappings(spec: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's spec gives discriminators without a mapping. By OpenAPI's rules the values would then be schema
    names ("ChatCompletionMessageToolCall"), but the API sends the branch's own constant ("function"); the
    mapping built here from each branch's enum says what the API really does."""
    schemas = spec["components"]["schemas"]

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            found = node.get("discriminator")
            if isinstance(found, dict) and "mapping" not in found:
                prop = found["propertyName"]
                mapping = {}
                for branch in node.get("oneOf") or node.get("anyOf") or []:
                    ref = branch.get("$ref", "")
                    values = schemas[ref.rsplit("/", 1)[-1]].get("properties", {}).get(prop, {}).get("enum", [])
                    mapping.update({value: ref for value in values})
                if mapping:
                    found["mapping"] = mapping
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(spec)
    return spec


def _served_models_only(spec: dict[str, Any]) -> dict[str, Any]:
    """`model` is "any string or one of these ids"; generated strings would nearly all be 404s. The upstream
    serves exactly the listed ids (conftest starts it so), so valid cases reach it and its answers get checked;
    negative cases still send other names."""
    models = spec["components"]["schemas"]["ModelIdsShared"]
    models["anyOf"] = [branch for branch in models["anyOf"] if "enum" in branch]
    return spec


schema = schemathesis.openapi.from_dict(
    _served_models_only(_with_discriminator_mappings(json.loads(SPEC_PATH.read_text("utf-8"))))
)
# The coverage phase sends about 1,200 boundary cases for the chat operation (about 20 s here); the examples
# and a bounded fuzzing phase (positive and negative cases) keep the run within seconds.
schema.config.phases.update(phases=["examples", "fuzzing"])
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@schema.parametrize()
@hypothesis.settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure here is reproducible, not a lottery
    suppress_health_check=list(hypothesis.HealthCheck),
    database=None,
)
def test_the_gateway_conforms_to_openais_spec(case: schemathesis.Case, stack: Stack) -> None:
    case.call_and_validate(base_url=stack.upstream_gateway.url + "/v1", checks=CHECKS, timeout=20)
