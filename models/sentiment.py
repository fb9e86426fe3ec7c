"""Chinese review sentiment: tokenizers, id encoding and the classifiers that training and the handler share.

Four architectures, all over token ids (0 = padding) with an ``embedding`` layer, so that captum's
LayerIntegratedGradients gives per-token attributions for each:

- ``TfidfLinearClassifier``: logistic regression over the TF-IDF vector of character 1-3-grams (the default, see
  README's table);
- ``FastTextClassifier``: masked mean of the token embeddings -> linear;
- ``TextCNN``: convolutions of widths 2-4 over the embeddings -> masked max over time -> linear;
- ``BiLSTMClassifier``: the course's chapter 11 model, a bidirectional LSTM over jieba words -> masked mean -> linear.

Each is padding-invariant: a review scores the same alone or padded in a batch.
Tokenizers (the manifest's ``tokenizer`` names one of ``TOKENIZERS``): character n-grams need no word
segmenter and no vocabulary tied to one domain; jieba words are what the course's LSTM reads.
"""

import logging
import re
import unicodedata
from collections.abc import Callable
from itertools import repeat

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

PAD_ID = 0
UNK_ID = 1
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

_WHITESPACE = re.compile(r"\s+")


RAW_CHARS_PER_CHAR = 4
"""Characters of raw text read per normalised character needed: NFKC composes at most a few code points into one
(a Hangul syllable from 3 jamo, a letter and its accents), so this many cover what a reading limit needs, and
nothing is normalised past them (NFKC expands some characters 18-fold: U+FDFA is 18 letters)."""


def _chunks(text: str, limit: int | None = None) -> list[str]:
    """NFKC-normalised (full-width letters, digits and punctuation become half-width), lower-cased text, split at
    whitespace runs; with ``limit``, of about the first ``limit`` characters only (``RAW_CHARS_PER_CHAR``), so that
    the cost of a text is bounded by what the model reads, not by its length."""
    if limit is not None:
        text = text[: RAW_CHARS_PER_CHAR * limit]
    return [chunk for chunk in _WHITESPACE.split(unicodedata.normalize("NFKC", text).lower()) if chunk]


def reading_length(tokens: int, longest: int) -> int:
    """Characters of normalised text that hold the first ``tokens`` character n-grams (each character starts at
    least one n-gram, and chunks are joined by one space)."""
    return 2 * tokens + longest


def tokenize(text: str, limit: int | None = None, longest: int = 2) -> list[str]:
    """Character unigrams and bigrams of the normalised text, in reading order: c1, c1c2, c2, c2c3, ...; the first
    ``limit`` of them when given. N-grams never span a whitespace boundary. ``longest=3`` adds trigrams after the
    bigram at each position: c1, c1c2, c1c2c3, c2, ...
    """
    tokens = []
    for chunk in _chunks(text, None if limit is None else reading_length(limit, longest)):
        if limit is not None:  # each position gives at least one token: later positions fall past the limit
            chunk = chunk[: limit - len(tokens) + longest - 1]
        size = len(chunk)
        tokens += [chunk[start : start + n] for start in range(size) for n in range(1, min(longest, size - start) + 1)]
        if limit is not None and len(tokens) >= limit:
            return tokens[:limit]
    return tokens


def tokenize_trigrams(text: str, limit: int | None = None) -> list[str]:
    """Character 1-, 2- and 3-grams of the normalised text, in reading order (see ``tokenize``)."""
    return tokenize(text, limit, longest=3)


WORD_CHARS_LIMIT = 8
"""tokenize_words segments at most limit x this many characters (a word averages under two)."""


def tokenize_words(text: str, limit: int | None = None) -> list[str]:
    """jieba's words (precise mode, HMM for unknown words) of the normalised text, in reading order; the first
    ``limit`` of them when given."""
    import jieba  # imported on first use: loading its dictionary takes a second

    jieba.setLogLevel(logging.WARNING)
    tokens = []
    for chunk in _chunks(text if limit is None else text[: limit * WORD_CHARS_LIMIT]):
        tokens += jieba.lcut(chunk)
    return tokens if limit is None else tokens[:limit]


TOKENIZERS = {"chars+bigrams": tokenize, "chars+1-3grams": tokenize_trigrams, "jieba-words": tokenize_words}
"""The tokenizers a manifest may name (``tokenizer``)."""


def tokenizer(name: str):
    """The tokenizer a manifest names; an unknown name (e.g. an artifact from an older release) says what fits."""
    try:
        return TOKENIZERS[name]
    except KeyError:
        raise ValueError(f"unknown tokenizer {name!r} in the manifest (known: {', '.join(TOKENIZERS)}); "
                         "retrain the artifact") from None


def encode(tokens: list[str], vocab_index: dict[str, int], max_tokens: int) -> list[int]:
    """Ids of the first max_tokens tokens; tokens outside the vocabulary map to UNK_ID."""
    tokens = tokens[:max_tokens]
    return list(map(vocab_index.get, tokens, repeat(UNK_ID, len(tokens))))


CHAR_NGRAM_LENGTHS = {"chars+bigrams": 2, "chars+1-3grams": 3}
"""The longest n-gram of each character n-gram tokenizer: what ``CharNgramEncoder`` computes for it."""

_CODE_BITS = 21  # Unicode code points + 1 fit in 21 bits, so an n-gram of up to 3 of them fits in one int64
_SPACE = ord(" ") + 1


class CharNgramEncoder:
    """A text -> the ids of its first ``max_tokens`` character n-grams, exactly ``encode(tokenize(text, max_tokens,
    longest), ...)`` without making a string per n-gram: the n-grams are int64 keys (each code point + 1 in 21 bits)
    computed with NumPy and looked up by binary search in the sorted keys of the vocabulary. This is what a request
    costs a serving worker (the string tokenizer made most of a review's CPU time).
    """

    def __init__(self, vocab: list[str], longest: int, max_tokens: int):
        if not 1 <= longest <= 3:
            raise ValueError(f"n-grams of up to 3 characters fit in an int64 key, not {longest}")
        self.longest, self.max_tokens = longest, max_tokens
        known = {self.key(token): index for index, token in enumerate(vocab)
                 if index not in (PAD_ID, UNK_ID) and 0 < len(token) <= longest}
        self.keys = np.array(sorted(known), dtype=np.int64)
        self.ids = np.array([known[key] for key in self.keys.tolist()], dtype=np.int64)

    @staticmethod
    def key(ngram: str) -> int:
        return sum((ord(char) + 1) << (_CODE_BITS * position) for position, char in enumerate(ngram))

    def __call__(self, text: str) -> np.ndarray:
        reading = reading_length(self.max_tokens, self.longest)
        joined = " ".join(_chunks(text, reading))[:reading]
        codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64) + 1
        grams = np.zeros((len(codes), self.longest), dtype=np.int64)  # [start, n - 1]; 0: no such n-gram
        inside = codes != _SPACE
        grams[:, 0] = codes * inside
        for extra in range(1, self.longest):
            inside = inside[:-1] & (codes[extra:] != _SPACE)
            grams[: len(codes) - extra, extra] = (grams[: len(codes) - extra, extra - 1]
                                                  | codes[extra:] << (_CODE_BITS * extra)) * inside
        keys = grams.ravel()
        keys = keys[keys != 0][: self.max_tokens]  # reading order: c1, c1c2, c1c2c3, c2, ...
        if not len(self.keys):
            return np.full(len(keys), UNK_ID, dtype=np.int64)
        found = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        return np.where(self.keys[found] == keys, self.ids[found], UNK_ID)


def text_encoder(name: str, vocab: list[str], max_tokens: int) -> Callable[[str], np.ndarray]:
    """A text -> the ids of its first ``max_tokens`` tokens under the manifest's tokenizer ``name``: character
    n-grams through ``CharNgramEncoder``, jieba words through ``encode``."""
    if name in CHAR_NGRAM_LENGTHS:
        return CharNgramEncoder(vocab, CHAR_NGRAM_LENGTHS[name], max_tokens)
    tokenize = tokenizer(name)
    vocab_index = {token: index for index, token in enumerate(vocab)}
    return lambda text: np.array(encode(tokenize(text, max_tokens), vocab_index, max_tokens), dtype=np.int64)


def padding_mask(ids: torch.Tensor) -> torch.Tensor:
    """1.0 where ``ids`` holds a token, 0.0 at padding: float[B, T, 1]."""
    return (ids != PAD_ID).unsqueeze(-1).float()


class FastTextClassifier(nn.Module):
    """Embedding (id 0 = padding) -> mean over non-padding positions -> dropout -> linear: ids[B, T] -> logits[B, C].

    The logits are linear in the mean embedding, so Integrated Gradients on ``embedding`` are exact and additive.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 64, num_classes: int = 2, dropout: float = 0.3):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = padding_mask(ids)
        pooled = (self.embedding(ids) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))


class TextCNN(nn.Module):
    """Kim's TextCNN: embedding -> one conv per width (ReLU) -> max over the windows that start on a token -> dropout
    -> linear. Each conv sees its input right-padded with width-1 zero vectors, so extra batch padding (whose
    embedding is zero too) changes no window that is kept."""

    def __init__(self, vocab_size: int, embed_dim: int = 64, num_classes: int = 2, channels: int = 64,
                 widths: tuple[int, ...] = (2, 3, 4), dropout: float = 0.3):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, channels, width) for width in widths)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels * len(widths), num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(ids).transpose(1, 2)  # [B, E, T]
        starts_on_token = ids != PAD_ID  # [B, T]
        pooled = []
        for conv in self.convs:
            windows = F.relu(conv(F.pad(embedded, (0, conv.kernel_size[0] - 1))))  # [B, channels, T]
            pooled.append(windows.masked_fill(~starts_on_token.unsqueeze(1), 0.0).amax(dim=2))
        return self.classifier(self.dropout(torch.cat(pooled, dim=1)))


class BiLSTMClassifier(nn.Module):
    """Embedding -> bidirectional LSTM over each review's own length (packed) -> mean of the outputs -> dropout ->
    linear: ids[B, T] -> logits[B, C]."""

    def __init__(self, vocab_size: int, embed_dim: int = 64, num_classes: int = 2, hidden: int = 64,
                 dropout: float = 0.3):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * hidden, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids != PAD_ID).sum(dim=1).clamp(min=1)
        packed = pack_padded_sequence(self.embedding(ids), lengths.cpu(), batch_first=True, enforce_sorted=False)
        outputs, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=ids.shape[1])
        pooled = outputs.sum(dim=1) / lengths.unsqueeze(1).to(outputs.dtype)  # padded outputs are zero
        return self.classifier(self.dropout(pooled))


def occurrences(ids: torch.Tensor) -> torch.Tensor:
    """How often each position's id occurs in its row: long[B, T], by sorting each row (O(T log T), not T x T).

    A sorted position starts a run where it differs from the one before it (-1 before the first: ids are >= 0).
    Comparing the padded row with itself, not ``ordered[:, 1:] != ordered[:, :-1]``, keeps torch.export's token axis
    dynamic down to one token: two [B, T - 1] views make it guard ``T - 1 != 1`` (a stride check), i.e. specialise
    the axis away from T = 2, and a two-token review is a valid request."""
    ordered, order = ids.sort(dim=1)
    starts = ordered != F.pad(ordered, (1, 0), value=-1)[:, :-1]
    run = starts.long().cumsum(dim=1) - 1  # index of each sorted position's run of equal ids
    run_length = torch.zeros_like(ids).scatter_add(1, run, torch.ones_like(ids))
    return torch.zeros_like(ids).scatter(1, order, run_length.gather(1, run))


class TfidfLinearClassifier(nn.Module):
    """Logistic regression over a review's TF-IDF vector, as scikit-learn's TfidfVectorizer(sublinear_tf=True, norm
    "l2") computes it from the ids: ids[B, T] -> logits[B, C].

    A token seen tf times in a review has the feature (1 + ln tf) x idf, and the review's features are divided by
    their Euclidean norm; ``idf`` is a buffer (0 for padding and <unk>, so they count for nothing), the class weights
    of each token are its ``embedding`` row. Each position carries 1/tf of its token's feature, so the logits are a
    sum over positions of embedding x a weight that depends on the ids only: linear in the embeddings, and
    Integrated Gradients on ``embedding`` are exact per position. Training (train/sentiment.py --arch tfidf) fits
    scikit-learn's LogisticRegression and copies its coefficients in; ``embed_dim`` is accepted and ignored, so
    every architecture takes the same arguments.
    """

    def __init__(self, vocab_size: int, embed_dim: int | None = None, num_classes: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, num_classes, padding_idx=PAD_ID)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        idf = torch.ones(vocab_size)
        idf[[PAD_ID, UNK_ID][: vocab_size]] = 0.0
        self.register_buffer("idf", idf)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tf = occurrences(ids).float()
        feature = (1.0 + torch.log(tf)) * self.idf[ids]  # the token's TF-IDF feature (0 at padding and <unk>)
        norm = ((feature**2) / tf).sum(dim=1, keepdim=True).sqrt().clamp(min=1e-12)  # each distinct token once
        weight = feature / (tf * norm)  # [B, T]
        return (self.embedding(ids) * weight.unsqueeze(-1)).sum(dim=1) + self.bias


ARCHITECTURES = {"FastTextClassifier": FastTextClassifier, "TfidfLinearClassifier": TfidfLinearClassifier,
                 "TextCNN": TextCNN, "BiLSTMClassifier": BiLSTMClassifier}
"""The constructors a manifest may name (``models.architecture``)."""


def calibrated_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature): the probabilities the handler serves, with the manifest's fitted temperature."""
    return torch.softmax(logits / temperature, dim=-1)


def export_example(manifest: dict, batch_size: int) -> dict:
    """What train/export.py traces and checks: padded ids [N, T] in (T dynamic: it grows with the batch here, so
    the export is checked at several lengths; row r ends in r padding ids), logits [N, C] out."""
    generator = torch.Generator().manual_seed(batch_size)
    length = 3 + 2 * batch_size
    ids = torch.randint(UNK_ID, manifest["arch_kwargs"]["vocab_size"], (batch_size, length), generator=generator)
    ids[torch.arange(length) >= (length - torch.arange(batch_size)).unsqueeze(1)] = PAD_ID
    spec = {"inputs": {"ids": ids}, "outputs": ["logits"], "dynamic": {"ids": {1: "tokens"}}}
    if manifest["architecture"] == "BiLSTMClassifier":
        spec["unsupported"] = {"onnx": "the BiLSTM packs its padded sequences (pack_padded_sequence), which "
                                       "torch.export cannot trace to ONNX; TorchScript and eager serve it"}
    return spec
