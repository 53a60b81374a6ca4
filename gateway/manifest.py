"""The specialist artifact's manifest: the gateway's own reading of the contract with router_models.

A version directory holds `model.onnx`, `manifest.json` and whatever the manifest names (a tokenizer, the
distill report). The gateway validates the manifest with this model and runs the ONNX file with onnxruntime
alone.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_SCHEMA_VERSION = 1
RouterFeature = Literal["max_prob", "margin", "entropy", "ood_score"]


class TextInput(BaseModel):
    """The ONNX graph takes raw text: a string tensor of shape [N, 1]."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["text"] = "text"
    name: str = "text"


class TokenInput(BaseModel):
    """The ONNX graph takes token ids made by a `tokenizers` tokenizer shipped in the version directory."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["tokens"] = "tokens"
    # A file of the version directory, by its plain name (nothing like "../x"), and its sha256; versions
    # written before the sha256 was recorded have none, and their tokenizer is not checked.
    tokenizer: str = Field(default="tokenizer.json", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    tokenizer_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    max_length: int = Field(default=128, ge=8, le=512)
    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    token_type_ids: str | None = "token_type_ids"


class Outputs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    probabilities: str = "probabilities"
    ood_score: str = "ood_score"


class RouterSpec(BaseModel):
    """s(x) = sigmoid(bias + sum(weights[i] * feature_i)); the specialist answers iff s(x) >= tau.

    Features are computed from the temperature-scaled probabilities by `gateway.router.router_features`.
    Inputs whose OOD score exceeds `ood_threshold` go to the teacher with reason `ood` whatever s(x) is.
    """

    model_config = ConfigDict(extra="forbid")
    features: list[RouterFeature]
    weights: list[float]
    bias: float
    ood_threshold: float

    @model_validator(mode="after")
    def _same_length(self) -> RouterSpec:
        if len(self.features) != len(self.weights):
            raise ValueError("router.features and router.weights must have the same length")
        return self


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")
    schema_version: int = MANIFEST_SCHEMA_VERSION
    task: str
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    created_at: str
    student: str
    labels: list[str] = Field(min_length=2)
    input: TextInput | TokenInput = Field(discriminator="kind")
    outputs: Outputs = Outputs()
    temperature: float = Field(gt=0.0)
    router: RouterSpec
    tau: float = Field(ge=0.0, le=1.0)
    target_agreement: float = Field(gt=0.0, le=1.0)
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    metrics: dict[str, float | int | str | None] = {}
    data_window: dict[str, str | int | None] = {}

    @model_validator(mode="after")
    def _labels_unique(self) -> Manifest:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        if self.schema_version != MANIFEST_SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not {MANIFEST_SCHEMA_VERSION}")
        return self
