"""Static word vectors distilled from the MiniLM sentence encoder, for the TF-IDF student's dense block.

Each word's vector is what all-MiniLM-L6-v2 makes of the word alone (the encoder run once per word, offline),
centred on the mean word and projected on its top principal components. A text's vector is then the
idf-weighted sum of its words' vectors, L2-normalised: a table lookup, no transformer at serving time. Words
that never occurred in training still land near their synonyms, which character n-grams cannot see.

Measured offline on CLINC150: 4,521 traffic rows labelled by the reference teacher, 60 iterations as distill
runs, the test split taken in the order of the student's confidence with out-of-scope inputs counted as
disagreements. Character n-grams alone serve 68.6% of in-scope test inputs at 0.97 agreement; with these
vectors beside them, 75.6%. In a first harness (the table's projection fitted on all words met, the row not
rescaled) 128 dimensions gave 77.9%, all 384 uncentred 76.7% and 64 dimensions 75.3%.

The table of the tokenizer's whole words (21.7k) took 15 s to encode on two cores here; it is cached
once per machine (`default_cache_dir`), keyed by the encoder file's sha256 and the dimensions. Words outside
it are encoded when a student meets them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from router_models.minilm import MiniLMEncoder

Float32Array = npt.NDArray[np.float32]
log = logging.getLogger("apprentice.word_vectors")
DEFAULT_DIMS = 128
_CACHE_FORMAT = 1
# The tokenizer's whole words: letters only, two or more (WordPiece continuations "##x" are not words).
_TOKENIZER_WORD = re.compile(r"[^\W\d_]{2,}")


@dataclass(frozen=True)
class Projection:
    """Centre and principal axes [dims, 384] fitted on the tokenizer's word table."""

    mean: Float32Array
    components: Float32Array

    def apply(self, embeddings: Float32Array) -> Float32Array:
        out: Float32Array = ((embeddings - self.mean) @ self.components.T).astype(np.float32)
        return out


def _write_atomically(path: Path, words: list[str], vectors: Float32Array, projection: Projection) -> None:
    """Write the table to a temporary file beside `path`, then rename it: a reader sees all or nothing, and
    concurrent builders write the same table (the last rename wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            mean, components = projection.mean, projection.components
            np.savez(f, words=np.array(words), vectors=vectors, mean=mean, components=components)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_cache_dir() -> Path:
    """$APPRENTICE_CACHE_DIR, else $XDG_CACHE_HOME/apprentice, else ~/.cache/apprentice: one table per machine,
    whatever directory distill runs in."""
    if os.environ.get("APPRENTICE_CACHE_DIR"):
        return Path(os.environ["APPRENTICE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "apprentice"


class WordVectors:
    """word -> vector [dims] (float32), from the cached tokenizer table plus words encoded on demand."""

    def __init__(self, dims: int = DEFAULT_DIMS, cache_dir: Path | None = None) -> None:
        self.dims = dims
        self.cache_dir = default_cache_dir() if cache_dir is None else cache_dir
        self._encoder: MiniLMEncoder | None = None
        words, vectors, self.projection = self._tokenizer_table()
        self._vectors: dict[str, Float32Array] = dict(zip(words, vectors, strict=True))

    def _encode(self, words: Sequence[str]) -> Float32Array:
        from router_models.minilm import MiniLMEncoder

        if self._encoder is None:
            self._encoder = MiniLMEncoder(batch_size=256)
        out: Float32Array = self._encoder.encode(list(words))
        return out

    def _tokenizer_table(self) -> tuple[list[str], Float32Array, Projection]:
        """(words, vectors [V, dims], projection) of the tokenizer's whole words, from the cache when there."""
        from tokenizers import Tokenizer

        from router_models.minilm import minilm_onnx_path, minilm_tokenizer_path

        digest = hashlib.sha256(minilm_onnx_path().read_bytes()).hexdigest()[:16]
        path = self.cache_dir / "word_vectors" / f"minilm-{digest}-d{self.dims}-v{_CACHE_FORMAT}.npz"
        if path.is_file():
            try:
                with np.load(path) as cached:
                    projection = Projection(cached["mean"], cached["components"])
                    return [str(w) for w in cached["words"]], cached["vectors"], projection
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                log.warning("word-vector cache %s is unreadable (%s); encoding the table again", path, exc)
        vocab = Tokenizer.from_file(str(minilm_tokenizer_path())).get_vocab()
        words = sorted(w for w in vocab if _TOKENIZER_WORD.fullmatch(w))
        embeddings = self._encode(words)
        mean = embeddings.mean(axis=0)
        # The top principal axes of the centred word table (its SVD; signs as LAPACK gives them).
        _, _, vt = np.linalg.svd((embeddings - mean).astype(np.float64), full_matrices=False)
        projection = Projection(mean.astype(np.float32), vt[: self.dims].astype(np.float32))
        vectors = projection.apply(embeddings)
        try:
            _write_atomically(path, words, vectors, projection)
        except OSError as exc:  # a read-only home must not stop distill; the next run encodes again
            log.warning("could not cache the word-vector table at %s (%s)", path, exc)
        return words, vectors, projection

    def table(self, words: Iterable[str]) -> tuple[list[str], Float32Array]:
        """(vocabulary, vectors [V, dims]): the tokenizer's words followed by `words` not among them."""
        extra = sorted({w for w in words if w not in self._vectors})
        if extra:
            self._vectors.update(zip(extra, self.projection.apply(self._encode(extra)), strict=True))
        vocabulary = list(self._vectors)
        return vocabulary, np.stack([self._vectors[w] for w in vocabulary]).astype(np.float32)
