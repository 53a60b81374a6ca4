"""ONNX export of the students, the parity check against Python, and a one-call TF-IDF version builder.

How to call it (e.g. to make a real artifact in a gateway test):

    from router_models.export import build_tfidf_artifact, write_tfidf_version
    onnx_bytes, student = build_tfidf_artifact(texts, ["greet", "bye", ...], labels=["bye", "greet"])
    version_dir = write_tfidf_version(registry_dir, "intent", texts, targets, labels, tau=0.5)
    # -> <registry_dir>/intent/versions/<version>/{model.onnx, manifest.json}, and `current` names it.

`targets` is either one label string per text (hard labels) or a float array [N, L] of soft targets whose
columns follow `labels`. The graph takes "text" (string [N, 1]) and returns "probabilities" (float32 [N, L],
columns in `labels` order, before temperature) and "ood_score" (float32 [N], higher = more out of
distribution). Training on a few hundred short texts takes well under a second.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.manifest import Manifest, Outputs, RouterSpec, TextInput, TokenInput
from router_models.onnx_head import attach_head
from router_models.registry import promote, version_name, write_version
from router_models.students import MAX_WORDS, ONNX_CHAR_TOKENEXP, ONNX_LOCALE, ONNX_TOKENEXP, TfidfStudent

OPSET = 17
PARITY_ATOL = 1e-4


class ParityError(RuntimeError):
    """The exported ONNX graph does not reproduce the Python model; the message shows the worst input."""


def tfidf_to_onnx(student: TfidfStudent) -> bytes:
    """The student's ONNX graph: skl2onnx's TfIdfVectorizer (C.UTF-8, re2 tokens) + the linear/OOD head."""
    from onnx.helper import make_opsetid
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.feature_extraction.text import TfidfVectorizer

    tokenexp = ONNX_CHAR_TOKENEXP if student.analyzer == "char" else ONNX_TOKENEXP
    with warnings.catch_warnings():
        # skl2onnx doubts its "char" analyzer in general; the parity check holds this graph to the Python model.
        warnings.filterwarnings("ignore", message="The conversion of CountVectorizer may not work")
        model = convert_sklearn(
            student.export_vectorizer(),
            initial_types=[("text", StringTensorType([None, 1]))],
            options={TfidfVectorizer: {"tokenexp": tokenexp, "locale": ONNX_LOCALE}},
            target_opset={"": OPSET, "ai.onnx.ml": 3},
            final_types=None,
        )
    # The Tokenizer pads a batch's shorter rows with pad_value tokens. skl2onnx picks "#", a character token
    # itself, so n-grams like "##" appeared in short rows of a batch; a multi-character pad matches no token.
    (tokenizer,) = [node for node in model.graph.node if node.op_type == "Tokenizer"]
    (pad,) = [a for a in tokenizer.attribute if a.name == "pad_value"]
    pad.s = b"<pad>"
    feature_name = model.graph.output[0].name
    dense_name: str | None = None
    if student.word_vectors:
        (normalizer,) = [node for node in model.graph.node if node.op_type == "StringNormalizer"]
        nodes, inits, feature_name, dense_name = _word_block_nodes(student, normalizer.output[0], feature_name)
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(inits)
        # LabelEncoder's string keys need ai.onnx.ml 2 or later; skl2onnx declares only what its nodes use.
        ml = [o for o in model.opset_import if o.domain == "ai.onnx.ml"]
        if ml:
            ml[0].version = max(ml[0].version, 2)
        else:
            model.opset_import.append(make_opsetid("ai.onnx.ml", 2))
    model = attach_head(
        model, feature_name, student.coef_, student.intercept_, student.centroids_,
        energy_mix=student.energy_mix_, sparse_input=True, dense_feature=dense_name,
        dense_columns=0 if dense_name is None else student.word_table_.shape[1],
    )  # fmt: skip
    words = " + word vectors" if student.word_vectors else ""
    model.doc_string = f"apprentice TF-IDF specialist ({student.analyzer} n-grams{words}, {len(student.labels)} labels)"
    data: bytes = model.SerializeToString()
    return data


def _word_block_nodes(student: TfidfStudent, lowered: str, tfidf: str) -> tuple[list[Any], list[Any], str, str]:
    """Nodes computing `TfidfStudent.features` with its word block from the lower-cased texts [N] and the
    TF-IDF rows [N, F]: (nodes, initializers, the scaled TF-IDF rows' name, the scaled word block's name).

    The first MAX_WORDS words of each text are looked up by a LabelEncoder (an unknown word or the
    Tokenizer's padding reads the zero row at the end of the table), their float16 vectors weighted by idf
    and summed, the sum scaled to unit length and by word_weight, and the row [tfidf | words] scaled to unit
    length, as in Python."""
    from onnx import TensorProto, helper, numpy_helper

    vocabulary = sorted(student.word_vocabulary_, key=student.word_vocabulary_.__getitem__)
    size, dims = student.word_table_.shape
    table = np.vstack([student.word_table_, np.zeros((1, dims), np.float16)])
    idf = np.append(student.word_idf_, np.float32(0.0)).astype(np.float32)
    inits = [
        numpy_helper.from_array(table, "wv_table"),
        numpy_helper.from_array(idf, "wv_idf"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "wv_axis1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "wv_axis2"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "wv_start"),
        numpy_helper.from_array(np.array([MAX_WORDS], dtype=np.int64), "wv_limit"),
        numpy_helper.from_array(np.array(1e-30, dtype=np.float32), "wv_tiny"),
        numpy_helper.from_array(np.array(student.word_weight, dtype=np.float32), "wv_weight"),
    ]
    node = helper.make_node
    nodes = [
        node(
            "Tokenizer",
            [lowered],
            ["wv_all_tokens"],
            domain="com.microsoft",
            mark=0,
            mincharnum=1,
            pad_value="<pad>",
            tokenexp=ONNX_TOKENEXP,
        ),
        node("Slice", ["wv_all_tokens", "wv_start", "wv_limit", "wv_axis1"], ["wv_tokens"]),  # the first MAX_WORDS
        node(
            "LabelEncoder",
            ["wv_tokens"],
            ["wv_ids"],
            domain="ai.onnx.ml",
            keys_strings=vocabulary,
            values_int64s=list(range(size)),
            default_int64=size,
        ),
        node("Gather", ["wv_table", "wv_ids"], ["wv_vectors16"], axis=0),  # [N, K, D]
        node("Cast", ["wv_vectors16"], ["wv_vectors"], to=TensorProto.FLOAT),
        node("Gather", ["wv_idf", "wv_ids"], ["wv_weights2d"], axis=0),  # [N, K]
        node("Unsqueeze", ["wv_weights2d", "wv_axis2"], ["wv_weights"]),  # [N, K, 1]
        node("Mul", ["wv_vectors", "wv_weights"], ["wv_terms"]),
        node("ReduceSum", ["wv_terms", "wv_axis1"], ["wv_sum"], keepdims=0),  # [N, D]
        node("ReduceSumSquare", ["wv_sum"], ["wv_sq"], axes=[1], keepdims=1),
        node("Sqrt", ["wv_sq"], ["wv_norm_raw"]),
        node("Max", ["wv_norm_raw", "wv_tiny"], ["wv_norm"]),
        node("Div", ["wv_sum", "wv_norm"], ["wv_unit"]),
        node("Mul", ["wv_unit", "wv_weight"], ["wv_block"]),
        node("ReduceSumSquare", [tfidf], ["wv_tfidf_sq"], axes=[1], keepdims=1),
        node("ReduceSumSquare", ["wv_block"], ["wv_block_sq"], axes=[1], keepdims=1),
        node("Add", ["wv_tfidf_sq", "wv_block_sq"], ["wv_row_sq"]),
        node("Sqrt", ["wv_row_sq"], ["wv_row_norm_raw"]),
        node("Max", ["wv_row_norm_raw", "wv_tiny"], ["wv_row_norm"]),
        node("Div", [tfidf, "wv_row_norm"], ["wv_tfidf_scaled"]),
        node("Div", ["wv_block", "wv_row_norm"], ["wv_block_scaled"]),
    ]
    return nodes, inits, "wv_tfidf_scaled", "wv_block_scaled"


class OnnxSpecialist:
    """Runs a specialist's model.onnx with onnxruntime alone, as the gateway does (text or token inputs)."""

    def __init__(
        self,
        model: bytes | Path,
        input_spec: TextInput | TokenInput,
        tokenizer: Path | None = None,
        threads: int = 1,
        outputs: Outputs | None = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        source = model if isinstance(model, bytes) else str(model)
        self.session: Any = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
        self.input_spec = input_spec
        self.tokenizer: Any = None
        if isinstance(input_spec, TokenInput):
            from tokenizers import Tokenizer

            if tokenizer is None:
                raise ValueError("a token-input specialist needs its tokenizer.json")
            self.tokenizer = Tokenizer.from_file(str(tokenizer))
            self.tokenizer.enable_truncation(max_length=input_spec.max_length)
            self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self._inputs = {i.name for i in self.session.get_inputs()}
        # The graph's output names, as its manifest declares them (the gateway reads them so too).
        self.outputs = outputs or Outputs()

    def _feeds(self, texts: Sequence[str]) -> dict[str, Any]:
        spec = self.input_spec
        if isinstance(spec, TextInput):
            return {spec.name: np.asarray(list(texts), dtype=object).reshape(-1, 1)}
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        feeds = {
            spec.input_ids: ids,
            spec.attention_mask: np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
        }
        if spec.token_type_ids and spec.token_type_ids in self._inputs:
            feeds[spec.token_type_ids] = np.zeros_like(ids)
        return feeds

    def predict(
        self, texts: Sequence[str], batch_size: int = 256
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(probabilities [N, L], ood [N]) in float64, rows in the order of `texts`.

        Batched so the dense TF-IDF rows stay small; token inputs are grouped by length so that a batch
        pads to its own longest text, not to the longest of all."""
        outputs = [self.outputs.probabilities, self.outputs.ood_score]
        shapes = {o.name: o.shape for o in self.session.get_outputs()}
        n_labels = int(shapes[outputs[0]][1])
        probs = np.zeros((len(texts), n_labels))
        ood = np.zeros(len(texts))
        order = list(range(len(texts)))
        if isinstance(self.input_spec, TokenInput):
            order.sort(key=lambda i: len(texts[i]))
            batch_size = min(batch_size, 32)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            p, o = self.session.run(outputs, self._feeds([texts[i] for i in idx]))
            probs[idx] = p
            ood[idx] = np.asarray(o).reshape(-1)
        return probs, ood


def load_version(version_dir: Path) -> tuple[Manifest, OnnxSpecialist]:
    """A registry version's manifest and its model.onnx, ready to score texts as the gateway would."""
    manifest = Manifest.model_validate_json((version_dir / "manifest.json").read_bytes())
    tokenizer = version_dir / manifest.input.tokenizer if manifest.input.kind == "tokens" else None
    return manifest, OnnxSpecialist(version_dir / "model.onnx", manifest.input, tokenizer, outputs=manifest.outputs)


def check_parity(
    onnx_specialist: OnnxSpecialist, student: Any, texts: Sequence[str], atol: float = PARITY_ATOL
) -> float:
    """Max abs difference of probabilities and OOD between ONNX and Python on `texts`; raises ParityError
    if it exceeds `atol`."""
    p_onnx, o_onnx = onnx_specialist.predict(texts)
    p_py, o_py = student.predict(texts)
    diff_p = np.abs(p_onnx - p_py).max(axis=1) if len(texts) else np.zeros(0)
    diff_o = np.abs(o_onnx - o_py) if len(texts) else np.zeros(0)
    worst = np.maximum(diff_p, diff_o)
    max_diff = float(worst.max()) if worst.size else 0.0
    if not np.isfinite(max_diff) or max_diff > atol:
        i = int(np.nanargmax(np.where(np.isfinite(worst), worst, np.inf)))
        raise ParityError(
            f"ONNX and Python disagree by {max_diff:.3g} (> {atol}) on {int((worst > atol).sum())} of "
            f"{len(texts)} inputs; worst input: {texts[i]!r}"
        )
    return max_diff


# Inputs that have broken text ONNX conversions before: empty, whitespace, accents, dotted capital I,
# scripts without spaces, emoji, underscores and digits, apostrophes, control characters, very long text.
ODD_TEXTS: tuple[str, ...] = (
    "",
    " ",
    "\t\n",
    "héllo wörld café",
    "İstanbul ǅ straße ß ΣΑΣ",
    "日本語のテキスト 東京タワー",
    "emoji 😀😀 test 🚀",
    "a b c",
    "x_y foo_bar 12 345 3.14",
    "don't can't won't",
    "ÀÉÎ õü ÑAND",
    "Ωmega σς",
    "ﬁne ligature",
    "١٢٣ arabic digits مرحبا",
    "k8s r2d2 w00t",
    "word " * 200,
    "WHAT IS MY BALANCE???",
    "\u200b zero\u200bwidth",
    "new\r\nline\x00nul",
)


def soft_targets_from(targets: Sequence[str] | npt.ArrayLike, labels: Sequence[str]) -> npt.NDArray[np.float64]:
    """[N, L] float64 targets from hard label strings (one-hot) or an already soft array."""
    if isinstance(targets, np.ndarray) and targets.ndim == 2:
        return targets.astype(np.float64)
    index = {label: i for i, label in enumerate(labels)}
    items = list(targets)  # type: ignore[arg-type]
    out = np.zeros((len(items), len(labels)))
    for row, label in enumerate(items):
        out[row, index[str(label)]] = 1.0
    return out


def build_tfidf_artifact(
    texts: Sequence[str], targets: Sequence[str] | npt.ArrayLike, labels: Sequence[str], **params: Any
) -> tuple[bytes, TfidfStudent]:
    """Train a TF-IDF student on (texts, targets) and export it; parity with Python is checked on the
    training texts (up to 500) and ODD_TEXTS. `params` go to `TfidfStudent`."""
    student = TfidfStudent(labels, **params).fit(list(texts), soft_targets_from(targets, labels))
    onnx_bytes = tfidf_to_onnx(student)
    check_parity(OnnxSpecialist(onnx_bytes, TextInput()), student, [*list(texts)[:500], *ODD_TEXTS])
    return onnx_bytes, student


def make_manifest(
    *,
    task: str,
    version: str,
    student: str,
    labels: Sequence[str],
    input_spec: TextInput | TokenInput,
    temperature: float,
    router: RouterSpec,
    tau: float,
    target_agreement: float,
    model_sha256: str,
    metrics: dict[str, float | int | str | None] | None = None,
    data_window: dict[str, str | int | None] | None = None,
) -> Manifest:
    return Manifest(
        task=task,
        version=version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        student=student,
        labels=list(labels),
        input=input_spec,
        temperature=temperature,
        router=router,
        tau=tau,
        target_agreement=target_agreement,
        model_sha256=model_sha256,
        metrics=metrics or {},
        data_window=data_window or {},
    )


DEFAULT_ROUTER = RouterSpec(features=["max_prob"], weights=[8.0], bias=-4.0, ood_threshold=0.95)


def write_tfidf_version(
    registry_dir: Path,
    task: str,
    texts: Sequence[str],
    targets: Sequence[str] | npt.ArrayLike,
    labels: Sequence[str],
    *,
    tau: float = 0.5,
    temperature: float = 1.0,
    router: RouterSpec | None = None,
    target_agreement: float = 0.97,
    do_promote: bool = True,
    **params: Any,
) -> Path:
    """Train, export, write a complete version dir (model.onnx + manifest.json) and, by default, promote it.

    The default router is s = sigmoid(8 * max_prob - 4), OOD threshold 0.95: enough for tests of the
    gateway's loader; `apprentice distill` fits the real one.
    """
    onnx_bytes, _ = build_tfidf_artifact(texts, targets, labels, **params)
    sha = hashlib.sha256(onnx_bytes).hexdigest()
    version = version_name(sha)
    manifest = make_manifest(
        task=task,
        version=version,
        student="tfidf",
        labels=labels,
        input_spec=TextInput(),
        temperature=temperature,
        router=router or DEFAULT_ROUTER,
        tau=tau,
        target_agreement=target_agreement,
        model_sha256=sha,
    )
    path = write_version(registry_dir, task, {"model.onnx": onnx_bytes}, manifest)
    if do_promote:
        promote(registry_dir, task, version)
    return path
