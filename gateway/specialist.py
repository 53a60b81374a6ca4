"""The specialist: one loaded, validated version of a task's ONNX model and the routing decision it makes.

API (used by `gateway.registry` and the request path)::

    sp = Specialist.load(version_dir, task="intent", labels=configured_labels)
        # raises SpecialistLoadError(reason, detail); reason is one of REFUSAL_REASONS
    d = sp.decide("how do I reset my pin", top_k=5)   # top_k=0: no label_distribution (saves ~8 µs)
    d.route              # "specialist" | "teacher"
    d.reason             # "specialist" | "ood" | "low_confidence"
    d.label              # argmax of the temperature-scaled probabilities, whichever route
    d.probability        # its probability; d.score = s(x); d.ood_score
    d.label_distribution # top_k (label, probability) pairs, most likely first (for `logprobs`)
    d.inference_ms       # wall time of decide(); d.cpu_s = CPU seconds of this thread (cost accounting)
    sp.task, sp.version, sp.manifest, sp.labels, sp.tau, sp.path, sp.loaded_at

The decision follows the contract exactly (gateway.router): p = apply_temperature(probabilities, T),
s = router_scores(p, ood, manifest.router); ood > router.ood_threshold -> teacher "ood"; elif s < tau ->
teacher "low_confidence"; else the specialist answers argmax(p). The per-request path re-implements those
functions for a single row with the constants hoisted (numpy's per-call overhead dominates at 150 floats);
tests check it against gateway.router.

A Specialist is immutable once loaded and safe to call from many threads at once (onnxruntime sessions are),
so the registry can swap whole objects while requests still hold the old one.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from pydantic import ValidationError

from gateway.manifest import Manifest, TextInput, TokenInput

# Why a version was refused (a metric label). bad_pointer is raised by the registry for a `current` file
# that does not name a version; the rest by Specialist.load.
RefusalReason = Literal["missing_file", "bad_pointer", "bad_manifest", "sha_mismatch", "labels_mismatch", "corrupt"]
REFUSAL_REASONS: tuple[RefusalReason, ...] = (
    "missing_file",
    "bad_pointer",
    "bad_manifest",
    "sha_mismatch",
    "labels_mismatch",
    "corrupt",
)
Route = Literal["specialist", "teacher"]
DecisionReason = Literal["specialist", "ood", "low_confidence"]

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
# Run once at load: proves the graph executes and its outputs have the declared shapes before any request
# depends on it, and warms onnxruntime's allocations so the first request is not the slow one.
_PROBE_TEXT = "hello, can you help me with this"


class SpecialistLoadError(Exception):
    """A version directory was refused; `reason` is one of REFUSAL_REASONS (a metric label)."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RefusalReason = reason
        self.detail = detail


# Not frozen: a frozen dataclass's __init__ costs ~4 µs more per request (object.__setattr__ per field).
@dataclass(slots=True)
class Decision:
    """What the router decided for one input, and what it cost. Read-only by convention."""

    label: str
    probability: float
    score: float
    ood_score: float
    route: Route
    reason: DecisionReason
    label_distribution: tuple[tuple[str, float], ...]
    inference_ms: float
    cpu_s: float
    version: str


def session_options() -> ort.SessionOptions:
    """One thread per session: the call then runs on the caller's thread, so `time.thread_time` measures it
    and concurrent requests scale across uvicorn workers instead of fighting over a shared pool."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise SpecialistLoadError("missing_file", f"{path} does not exist") from exc
    except OSError as exc:
        raise SpecialistLoadError("missing_file", f"cannot read {path}: {exc}") from exc


def _load_manifest(version_dir: Path, task: str) -> Manifest:
    raw = _read(version_dir / MANIFEST_FILE)
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "<root>"
        raise SpecialistLoadError(
            "bad_manifest", f"{exc.error_count()} error(s), first at {where}: {first['msg']}"
        ) from exc
    if manifest.task != task:
        raise SpecialistLoadError("bad_manifest", f"manifest is for task {manifest.task!r}, not {task!r}")
    if manifest.version != version_dir.name:
        raise SpecialistLoadError(
            "bad_manifest", f"manifest version {manifest.version!r} != directory {version_dir.name!r}"
        )
    return manifest


def _check_labels(manifest: Manifest, labels: Sequence[str]) -> None:
    missing = sorted(set(labels) - set(manifest.labels))
    extra = sorted(set(manifest.labels) - set(labels))
    if missing or extra:
        raise SpecialistLoadError(
            "labels_mismatch",
            f"manifest lacks {len(missing)} configured label(s) {missing[:5]} and has {len(extra)} "
            f"unconfigured {extra[:5]}",
        )


def _open_session(model_bytes: bytes) -> ort.InferenceSession:
    # Built from the bytes that were hashed, never from the path again: a file swapped between the check
    # and the load can't slip an unverified model in.
    try:
        return ort.InferenceSession(model_bytes, sess_options=session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped pybind errors for bad graphs
        raise SpecialistLoadError("corrupt", f"onnxruntime cannot load {MODEL_FILE}: {exc}") from exc


def _check_io(session: ort.InferenceSession, manifest: Manifest) -> None:
    inputs = {node.name: node.type for node in session.get_inputs()}
    outputs = {node.name for node in session.get_outputs()}
    spec = manifest.input
    if isinstance(spec, TextInput):
        declared = {spec.name: "tensor(string)"}
    else:
        declared = {spec.input_ids: "tensor(int64)", spec.attention_mask: "tensor(int64)"}
        # token_type_ids is optional on both sides (the manifest defaults it; exporters often drop it): fed
        # when the graph has it, as router_models feeds it at export time.
        if spec.token_type_ids is not None and spec.token_type_ids in inputs:
            declared[spec.token_type_ids] = "tensor(int64)"
    problems = [
        f"input {name!r} ({dtype}) declared but the model has {inputs.get(name, 'no such input')}"
        for name, dtype in declared.items()
        if inputs.get(name) != dtype
    ]
    problems += [f"model input {name!r} is not declared in the manifest" for name in inputs if name not in declared]
    problems += [
        f"output {name!r} declared but not in the model"
        for name in (manifest.outputs.probabilities, manifest.outputs.ood_score)
        if name not in outputs
    ]
    if problems:
        raise SpecialistLoadError("bad_manifest", "; ".join(problems))


Feeds = Callable[[str], dict[str, npt.NDArray[Any]]]


def _text_feeds(name: str) -> Feeds:
    def feeds(text: str) -> dict[str, npt.NDArray[Any]]:
        return {name: np.array([[text]], dtype=object)}

    return feeds


def _token_feeds(version_dir: Path, spec: TokenInput, model_inputs: set[str]) -> Feeds:
    from tokenizers import Tokenizer  # only token-input (MiniLM) students pay for the import

    path = version_dir / spec.tokenizer
    try:
        data = path.read_bytes()  # hashed and parsed from the same bytes: a file swapped between is caught
    except FileNotFoundError as exc:
        raise SpecialistLoadError("missing_file", f"{path} does not exist") from exc
    except OSError as exc:
        raise SpecialistLoadError("missing_file", f"cannot read {path}: {exc}") from exc
    if spec.tokenizer_sha256 is not None and hashlib.sha256(data).hexdigest() != spec.tokenizer_sha256:
        raise SpecialistLoadError(
            "sha_mismatch", f"{spec.tokenizer} has sha256 {hashlib.sha256(data).hexdigest()}, "
            f"manifest says {spec.tokenizer_sha256}",
        )  # fmt: skip
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # the tokenizers binding raises a bare Exception on a bad file
        raise SpecialistLoadError("corrupt", f"cannot load tokenizer {spec.tokenizer}: {exc}") from exc
    # Configured once here: truncation is tokenizer state, and a single input needs no padding.
    tokenizer.enable_truncation(max_length=spec.max_length)
    tokenizer.no_padding()
    ids_name, mask_name = spec.input_ids, spec.attention_mask
    types_name = spec.token_type_ids if spec.token_type_ids in model_inputs else None

    def feeds(text: str) -> dict[str, npt.NDArray[Any]]:
        encoding = tokenizer.encode(text)
        out = {
            ids_name: np.array([encoding.ids], dtype=np.int64),
            mask_name: np.array([encoding.attention_mask], dtype=np.int64),
        }
        if types_name is not None:
            out[types_name] = np.array([encoding.type_ids], dtype=np.int64)
        return out

    return feeds


class Specialist:
    """One loaded version of a task's specialist. Build with `Specialist.load`."""

    def __init__(
        self, *, path: Path, task: str, manifest: Manifest, session: ort.InferenceSession, feeds: Feeds
    ) -> None:
        self.path = path
        self.task = task
        self.manifest = manifest
        self.version = manifest.version
        self.labels: tuple[str, ...] = tuple(manifest.labels)
        self.tau = manifest.tau
        self.loaded_at = time.time()
        self._session = session
        self._feeds = feeds
        self._output_names = [manifest.outputs.probabilities, manifest.outputs.ood_score]
        spec = manifest.router
        self._inv_temperature = 1.0 / manifest.temperature
        self._unit_temperature = manifest.temperature == 1.0
        self._bias = spec.bias
        self._weighted = tuple(zip(spec.features, spec.weights, strict=True))
        self._need_margin = "margin" in spec.features
        self._need_entropy = "entropy" in spec.features
        self._log_n_labels = math.log(len(self.labels))
        self._ood_threshold = spec.ood_threshold

    @classmethod
    def load(cls, version_dir: Path, *, task: str, labels: Sequence[str]) -> Specialist:
        """Load and validate one version directory; raises SpecialistLoadError naming why it was refused."""
        if not version_dir.is_dir():
            raise SpecialistLoadError("missing_file", f"version directory {version_dir} does not exist")
        manifest = _load_manifest(version_dir, task)
        _check_labels(manifest, labels)
        if isinstance(manifest.input, TokenInput) and not (version_dir / manifest.input.tokenizer).is_file():
            # Before the model is hashed and run: a version still being copied is refused cheaply, and retried.
            tokenizer = version_dir / manifest.input.tokenizer
            raise SpecialistLoadError("missing_file", f"{tokenizer} is not there (or not a file)")
        model_bytes = _read(version_dir / MODEL_FILE)
        digest = _sha256(model_bytes)
        if digest != manifest.model_sha256:
            raise SpecialistLoadError(
                "sha_mismatch",
                f"{MODEL_FILE} sha256 {digest[:12]}… != manifest {manifest.model_sha256[:12]}…",
            )
        session = _open_session(model_bytes)
        _check_io(session, manifest)
        spec = manifest.input
        if isinstance(spec, TextInput):
            feeds = _text_feeds(spec.name)
        else:
            feeds = _token_feeds(version_dir, spec, {node.name for node in session.get_inputs()})
        specialist = cls(path=version_dir, task=task, manifest=manifest, session=session, feeds=feeds)
        specialist._probe()
        return specialist

    def _probe(self) -> None:
        try:
            probabilities, ood = self._run(_PROBE_TEXT)
        except Exception as exc:  # any runtime failure of the graph means the artifact is unusable
            raise SpecialistLoadError("corrupt", f"probe inference failed: {exc}") from exc
        n_labels = len(self.labels)
        if probabilities.shape != (1, n_labels):
            raise SpecialistLoadError(
                "corrupt", f"probabilities have shape {probabilities.shape}, expected (1, {n_labels})"
            )
        if ood.size != 1:
            raise SpecialistLoadError("corrupt", f"ood_score has shape {ood.shape}, expected (1,) or (1, 1)")
        if not (np.isfinite(probabilities).all() and np.isfinite(ood).all()):
            raise SpecialistLoadError("corrupt", "probe inference returned non-finite values")

    def _run(self, text: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        probabilities, ood = self._session.run(self._output_names, self._feeds(text))
        return probabilities, ood

    def decide(self, text: str, top_k: int = 5) -> Decision:
        """Run the model on one input and apply the routing rule. Thread-safe.

        `top_k` sizes `label_distribution` (0 skips it, saving a few µs when the client wants no logprobs).
        The label is the argmax whatever the route, so shadow traffic can compare it with the teacher's.
        """
        wall0 = time.perf_counter()
        cpu0 = time.thread_time()
        raw, ood_raw = self._run(text)
        ood = float(ood_raw.item())  # one element: checked at load
        p, scale, best, entropy = self._calibrate(raw[0])
        top1 = float(p[best]) * scale
        margin = 0.0
        if self._need_margin:
            # second largest without a sort: mask the best, take the max, restore
            p[best] = -1.0
            margin = top1 - float(p.max()) * scale
            p[best] = top1 / scale
        z = self._bias
        for feature, weight in self._weighted:
            if feature == "max_prob":
                z += weight * top1
            elif feature == "margin":
                z += weight * margin
            elif feature == "entropy":
                z += weight * entropy
            else:
                z += weight * ood
        # sigmoid; math.exp overflows past ~709, where the score is 0.0 to double precision anyway
        score = 1.0 / (1.0 + math.exp(-z)) if z > -700.0 else 0.0
        if ood > self._ood_threshold:
            route: Route = "teacher"
            reason: DecisionReason = "ood"
        elif score < self.tau:
            route, reason = "teacher", "low_confidence"
        else:
            route, reason = "specialist", "specialist"
        distribution: tuple[tuple[str, float], ...] = ()
        if top_k > 0:
            labels = self.labels
            # a full argsort of a few hundred floats beats argpartition + a second sort (measured)
            order = np.argsort(-p, kind="stable")[:top_k].tolist()
            distribution = tuple((labels[i], float(p[i]) * scale) for i in order)
        cpu_s = time.thread_time() - cpu0
        return Decision(
            label=self.labels[best],
            probability=top1,
            score=score,
            ood_score=ood,
            route=route,
            reason=reason,
            label_distribution=distribution,
            inference_ms=(time.perf_counter() - wall0) * 1000.0,
            cpu_s=cpu_s,
            version=self.version,
        )

    def _calibrate(self, row: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float64], float, int, float]:
        """apply_temperature for one row as (p, scale, argmax, normalised entropy or 0.0 if not a feature):
        the calibrated probabilities are p * scale, so the common T == 1 case never divides the whole row.
        """
        p = row.astype(np.float64)
        # Only the lower clip matters: softmax output never exceeds 1 by more than an ulp, and the row is
        # renormalised next anyway.
        np.maximum(p, 1e-12, out=p)
        if self._unit_temperature:
            # p^(1/1) renormalised: no log/exp round trip over every label
            scale = 1.0 / float(p.sum())
            best = int(p.argmax())
            entropy = 0.0
            if self._need_entropy:
                q = p * scale
                entropy = -float(q @ np.log(q)) / self._log_n_labels
            return p, scale, best, entropy
        np.log(p, out=p)
        p *= self._inv_temperature
        best = int(p.argmax())
        p -= p[best]
        q = np.exp(p)
        total = float(q.sum())
        q /= total
        entropy = 0.0
        if self._need_entropy:
            # log q = p - log(total), so -sum(q log q) = log(total) - q @ p
            entropy = (math.log(total) - float(q @ p)) / self._log_n_labels
        return q, 1.0, best, entropy
