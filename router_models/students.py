"""Specialist students trained on the teacher's soft labels: a TF-IDF linear model and a MiniLM-embedding one.

Both minimise soft-label cross-entropy, -sum_k t_k log p_k: the loss of a multinomial logistic regression
fitted on one row per (input, label) pair weighted by the target probability t_k, minimised directly on the
soft targets by `router_models.softmax_regression`. Tiny target probabilities are pruned (top-k, minimum
mass). Each student also carries the OOD scorer of `router_models.ood` on the same features: a hidden
"teacher declined" class trained on the log's declines, and label centroids, beside the labels' free energy
(`router_models.onnx_head`), mixed by `energy_mix_` (0 until distill fits it).

Students follow the scikit-learn estimator contract: `__init__` stores parameters, `fit` learns, learned
state ends in `_`, `predict` is pure. `predict(texts) -> (probabilities [N, L], ood [N])` is the reference
the exported ONNX graph is checked against.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from router_models.onnx_head import head_parts, mix_ood
from router_models.ood import fit_centroids, with_decline_class
from router_models.softmax_regression import SparseDense, fit_soft_softmax

Float64Array = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]
StudentKind = Literal["tfidf", "minilm"]

# The ONNX Tokenizer (re2) splits on this; scikit-learn's default `\b\w\w+\b` finds the same tokens for every
# character assigned in Python's Unicode database (measured over all code points).
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
ONNX_TOKENEXP = r"[\pL\pN_]{2,}"
ONNX_LOCALE = "C.UTF-8"


def onnx_lowercase_compat(text: str) -> str:
    """Make Python's lower-casing match ONNX StringNormalizer's (C.UTF-8 towlower) before scikit-learn sees it.

    Two code points lower differently. U+0130 (capital I with dot): Python's full case mapping gives "i" +
    U+0307, the simple mapping ONNX uses gives "i". U+03A3 (capital sigma): Python gives the final form U+03C2
    at the end of a word, ONNX always U+03C3.
    """
    return text.replace("\u0130", "i").replace("\u03a3", "\u03c3")


def centroid_start(centroids: Float32Array, scale: float = 10.0) -> Float32Array:
    """Starting weights [L + 1, F]: logits = scale * cos(x, centroid) (a nearest-centroid classifier) and a
    zero decline row. On 100k CLINC-style rows it reaches in 45 iterations what a zero start needs 55 for."""
    out: Float32Array = np.vstack([scale * centroids, np.zeros((1, centroids.shape[1]), np.float32)])
    return out.astype(np.float32)


class _SoftmaxHead:
    """What both students share: the soft-label softmax head with its hidden decline class, the label
    centroids behind the OOD score, and `predict` over the student's `features`."""

    c: float
    max_iter: int
    top_k: int
    min_prob: float
    coef_: Float32Array
    intercept_: Float32Array
    centroids_: Float32Array
    # The OOD score's weight on the labels' free energy (`router_models.onnx_head`); distill fits it after
    # training (`calibration.fit_energy_mix`). 0 is the score of the decline class and the centroids alone.
    energy_mix_: float = 0.0

    def features(self, texts: Sequence[str]) -> Any:
        raise NotImplementedError

    def _fit_head(
        self, x: Any, targets: Float64Array, n_declines: int, on_iter: Callable[[int, float], None] | None
    ) -> None:
        """Fit on feature rows `x`: the labelled inputs first (their soft `targets`), then `n_declines` declines."""
        self.centroids_ = fit_centroids(x[: targets.shape[0]], targets)
        self.coef_, self.intercept_, self.n_iter_ = fit_soft_softmax(
            x, with_decline_class(targets, n_declines), c=self.c, max_iter=self.max_iter,
            top_k=self.top_k, min_prob=self.min_prob, on_iter=on_iter, init_coef=centroid_start(self.centroids_),
        )  # fmt: skip

    def predict_parts(self, texts: Sequence[str]) -> tuple[Float64Array, Float64Array, Float64Array]:
        """(probabilities [N, L] before temperature, and the OOD score's two parts [N]: unlike, energy)."""
        return head_parts(self.features(texts), self.coef_, self.intercept_, self.centroids_)

    def predict(self, texts: Sequence[str]) -> tuple[Float64Array, Float64Array]:
        """(probabilities [N, L] before temperature, OOD scores [N])."""
        probabilities, unlike, energy = self.predict_parts(texts)
        return probabilities, mix_ood(unlike, energy, self.energy_mix_)


TfidfAnalyzer = Literal["char", "word"]
# The n-gram lengths each analyzer counts. Characters 2-4 against words 1-2, on 7k CLINC150 traffic rows labelled
# by the reference teacher: 76.6% of in-scope test inputs served at 0.97 agreement against 69.6% (taken in the
# order of the student's max probability), and half the out-of-scope inputs above the in-scope 95th OOD
# percentile against a third.
NGRAM_RANGES: dict[TfidfAnalyzer, tuple[int, int]] = {"char": (2, 4), "word": (1, 2)}
# Characters as the ONNX Tokenizer (re2) sees them: every code point, newlines included. scikit-learn's own
# "char" analyzer also folds runs of whitespace, which ONNX cannot do, so the Python side uses `char_ngrams`.
ONNX_CHAR_TOKENEXP = r"(?s)."


# The word block reads at most this many words of a text. Intents are short; without a cap the graph's
# [words, dims] tensors made one 4 MB message cost 1.9 GB and 8 s (all-MiniLM-L6-v2 itself reads 128 tokens).
MAX_WORDS = 256
_WORD = re.compile(TOKEN_PATTERN)


def first_words(text: str) -> list[str]:
    """The first MAX_WORDS words of a lower-cased text, as the graph's Tokenizer and Slice find them."""
    return _WORD.findall(text)[:MAX_WORDS]


def char_ngrams(text: str, lo: int = 2, hi: int = 4) -> list[str]:
    """Lower-cased character n-grams of `text`, lo to hi long, as the exported graph counts them."""
    chars = onnx_lowercase_compat(text).lower()
    return [chars[i : i + n] for n in range(lo, hi + 1) for i in range(len(chars) - n + 1)]


class TfidfStudent(_SoftmaxHead):
    """TF-IDF n-grams (+ static word vectors) + soft-label multinomial logistic regression + centroid OOD.

    `analyzer` "char" (the default) counts character 2-4-grams across word boundaries, "word" counts word 1-2
    grams. No sublinear_tf and no max_df: skl2onnx converts them silently wrong. The vocabulary is capped at
    `max_features` by document frequency; with words it is closed under bigram parts (every kept bigram's
    words are kept), because the ONNX TfIdfVectorizer looks bigrams up through their unigrams.

    With `word_vectors` (the default) a dense block sits beside the n-grams: the idf-weighted sum of the
    text's static word vectors (`router_models.word_vectors`), unit length, scaled by `word_weight`; the
    whole feature row is then scaled to unit length. The vectors are stored in float16, in the model and
    in the ONNX graph alike.
    """

    kind: StudentKind = "tfidf"

    def __init__(
        self,
        labels: Sequence[str],
        *,
        analyzer: TfidfAnalyzer = "char",
        max_features: int = 20000,
        min_df: int = 1,
        # Measured with kd_temperature 1.0 on 5k CLINC150 traffic rows: C 40 serves 71.5% of in-scope test inputs
        # at 0.97 agreement (oracle order), C 20 70.1% (word n-grams; characters: C 40 and 100 within 0.3%).
        c: float = 40.0,
        max_iter: int = 100,
        top_k: int = 5,
        min_prob: float = 0.01,
        word_vectors: bool = True,
        # Offline on CLINC150 (see router_models.word_vectors), 100 iterations: 1.0 served 75.5% at 0.97, 1.5 73.6%.
        word_weight: float = 1.0,
        word_dims: int = 128,
    ) -> None:
        self.labels = list(labels)
        self.analyzer = analyzer
        self.word_vectors = word_vectors
        self.word_weight = word_weight
        self.word_dims = word_dims
        self.max_features = max_features
        self.min_df = min_df
        self.c = c
        self.max_iter = max_iter
        self.top_k = top_k
        self.min_prob = min_prob

    def _vectorizer(self, vocabulary: dict[str, int] | None, *, for_export: bool = False) -> Any:
        """scikit-learn's TfidfVectorizer for this analyzer. Character n-grams are counted by `char_ngrams`
        (exactly what the graph counts); `for_export` gives skl2onnx the "char" analyzer it converts instead."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        lo, hi = NGRAM_RANGES[self.analyzer]
        common: dict[str, Any] = {
            "ngram_range": (lo, hi), "min_df": 1 if vocabulary is not None else self.min_df,
            "vocabulary": vocabulary, "dtype": np.float32,
        }  # fmt: skip
        if self.analyzer == "word":
            return TfidfVectorizer(token_pattern=TOKEN_PATTERN, lowercase=True, **common)
        if for_export:
            return TfidfVectorizer(analyzer="char", lowercase=True, **common)
        common["ngram_range"] = (1, 1)  # unused with a callable analyzer, which counts lo to hi itself
        return TfidfVectorizer(analyzer=partial(char_ngrams, lo=lo, hi=hi), lowercase=False, **common)

    def _parts(self, term: str) -> list[str]:
        """The unigrams the ONNX lookup of word bigram `term` passes through. Character n-grams need none:
        a graph without any 3-gram prefix of its 4-grams still matched Python to 1e-6."""
        return term.split(" ") if self.analyzer == "word" and " " in term else []

    def _tfidf(self, texts: list[str]) -> tuple[dict[str, int], npt.NDArray[np.float64], sp.csr_matrix]:
        """(vocabulary, idf, L2-normalised TF-IDF rows) from one counting pass over `texts`.

        Terms are kept by document frequency (ties broken by term, so the choice is deterministic) and the
        kept set is closed under `_parts`; columns are in document-frequency order, which keeps the
        weight rows of frequent terms together in cache during training. idf and normalisation follow
        scikit-learn's TfidfVectorizer (smooth_idf, norm l2) exactly; the parity check proves it."""
        from sklearn.preprocessing import normalize

        counter = self._vectorizer(None).set_params(use_idf=False, norm=None)  # raw counts
        counts = counter.fit_transform(texts).tocsr()
        terms = counter.get_feature_names_out()
        df = counts.getnnz(axis=0)
        order = np.lexsort((terms, -df))
        chosen = set(order[: self.max_features].tolist())
        position = {term: j for j, term in enumerate(terms.tolist())}
        for j in list(chosen):
            chosen.update(position[part] for part in self._parts(str(terms[j])))
        columns = [j for j in order.tolist() if j in chosen]
        vocabulary = {str(terms[j]): i for i, j in enumerate(columns)}
        idf = np.log((1.0 + counts.shape[0]) / (1.0 + df[columns])) + 1.0
        x = normalize(counts[:, columns].multiply(idf.astype(np.float32)).tocsr(), norm="l2", copy=False)
        return vocabulary, idf, x.astype(np.float32)

    def fit(
        self,
        texts: Sequence[str],
        targets: Float64Array,
        on_iter: Callable[[int, float], None] | None = None,
        decline_texts: Sequence[str] = (),
    ) -> TfidfStudent:
        """Learn from `texts` with soft `targets` [N, L]; `decline_texts` (inputs the teacher declined) train
        the hidden decline class behind the OOD score, never a label."""
        clean = [onnx_lowercase_compat(t) for t in [*texts, *decline_texts]]
        vocabulary, idf, x = self._tfidf(clean)
        self.vectorizer_ = self._vectorizer(vocabulary).fit(clean[:1])
        self.vectorizer_.idf_ = idf
        if self.word_vectors:
            self._fit_word_block(clean)
            x = self._join(x, self._word_block(clean))
        self._fit_head(x, targets, len(decline_texts), on_iter)
        return self

    def _word_counter(self, vocabulary: dict[str, int]) -> Any:
        """Counts of the vocabulary's words among each text's first MAX_WORDS words, as the graph counts them."""
        from sklearn.feature_extraction.text import CountVectorizer

        return CountVectorizer(analyzer=first_words, vocabulary=vocabulary, dtype=np.float32)

    def _fit_word_block(self, clean: list[str]) -> None:
        """The word vocabulary (the tokenizer's words and the training words), its float16 vectors and idf."""
        from router_models.word_vectors import WordVectors

        lowered = [t.lower() for t in clean]
        seen = {word for text in lowered for word in first_words(text)}
        words, table = WordVectors(self.word_dims).table(seen)
        self.word_vocabulary_ = {w: i for i, w in enumerate(words)}
        self.word_table_ = table.astype(np.float16)
        counts = self._word_counter(self.word_vocabulary_).transform(lowered)
        df = np.asarray((counts > 0).sum(axis=0)).ravel()
        # scikit-learn's smooth idf; a word no training text holds gets the largest, log(1 + n) + 1.
        self.word_idf_ = (np.log((1.0 + len(clean)) / (1.0 + df)) + 1.0).astype(np.float32)

    def _word_block(self, clean: Sequence[str]) -> Float32Array:
        """Unit rows [N, dims]: the idf-weighted sum of each text's word vectors (zero without known words)."""
        counts = self._word_counter(self.word_vocabulary_).transform([t.lower() for t in clean])
        weighted = self.word_table_.astype(np.float32) * self.word_idf_[:, None]
        block = np.asarray(counts @ weighted, dtype=np.float32)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        out: Float32Array = np.divide(block, norms, out=np.zeros_like(block), where=norms > 0)
        return out

    def _join(self, tfidf: sp.csr_matrix, words: Float32Array) -> SparseDense:
        """[tfidf | word_weight * words], each row scaled to unit length (zero rows stay zero)."""
        dense = self.word_weight * words
        sq = np.asarray(tfidf.multiply(tfidf).sum(axis=1)).ravel() + (dense * dense).sum(axis=1)
        scale = np.divide(1.0, np.sqrt(sq), out=np.zeros_like(sq), where=sq > 0).astype(np.float32)
        return SparseDense(sp.diags(scale) @ tfidf, dense * scale[:, None])

    def export_vectorizer(self) -> Any:
        """The fitted vectorizer in the form skl2onnx converts (same vocabulary and idf)."""
        if self.analyzer == "word":
            return self.vectorizer_
        carrier = self._vectorizer(self.vectorizer_.vocabulary_, for_export=True).fit([""])
        carrier.idf_ = self.vectorizer_.idf_
        return carrier

    def features(self, texts: Sequence[str]) -> sp.csr_matrix | SparseDense:
        """Unit rows [N, F]: TF-IDF (float32, sparse), with the word-vector block beside it when enabled."""
        clean = [onnx_lowercase_compat(t) for t in texts]
        tfidf = self.vectorizer_.transform(clean).tocsr()
        return self._join(tfidf, self._word_block(clean)) if self.word_vectors else tfidf


class MiniLMStudent(_SoftmaxHead):
    """all-MiniLM-L6-v2 sentence embeddings (router_models.minilm) + soft-label softmax head + centroid OOD.

    The embeddings are L2-normalised, so the cosine to the label centroids behind the OOD score is a dot
    product. Its ONNX graph is the int8 encoder itself with pooling, normalisation and this head appended.
    """

    kind: StudentKind = "minilm"

    def __init__(
        self,
        labels: Sequence[str],
        *,
        c: float = 200.0,
        max_iter: int = 200,
        top_k: int = 5,
        min_prob: float = 0.01,
        batch_size: int = 64,
    ) -> None:
        self.labels = list(labels)
        self.c = c
        self.max_iter = max_iter
        self.top_k = top_k
        self.min_prob = min_prob
        self.batch_size = batch_size

    def _encoder(self) -> Any:
        from router_models.minilm import MiniLMEncoder

        if getattr(self, "encoder_", None) is None:
            self.encoder_ = MiniLMEncoder(batch_size=self.batch_size)
        return self.encoder_

    def features(self, texts: Sequence[str]) -> Float32Array:
        """Embeddings [N, 384], unit rows."""
        out: Float32Array = self._encoder().encode(list(texts))
        return out

    def fit(
        self,
        texts: Sequence[str],
        targets: Float64Array,
        on_iter: Callable[[int, float], None] | None = None,
        decline_texts: Sequence[str] = (),
    ) -> MiniLMStudent:
        """As TfidfStudent.fit: soft targets [N, L] for `texts`, `decline_texts` for the decline class."""
        x = self.features([*texts, *decline_texts])
        self._fit_head(x, targets, len(decline_texts), on_iter)
        return self
