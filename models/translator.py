"""translator: a GRU encoder-decoder with attention (the PyTorch course's chapter 12), and its decoding.

``Seq2Seq``: token embedding, a bidirectional GRU encoder, additive (Bahdanau) or dot-product (Luong) attention over
the encoder's states, and a GRU decoder that reads the previous token and the attention context. Training feeds the
reference's previous token (teacher forcing, ``forward``); serving decodes step by step (``greedy``, ``beam_search``).

What the default model learns (train/translator.py, no parallel corpus ships in an installable package here):
English number names -> French number names, the references written by ``num2words`` (0..999,999, e.g.
"seventy-one" -> "soixante et onze", "ninety-seven" -> "quatre-vingt-dix-sept", "two thousand and five" ->
"deux mille cinq"). French reorders and composes (soixante-dix = 60 + 10, quatre-vingts = 4 x 20, "et" before
"un"/"onze" in some tens only, "cents" plural only when nothing follows), so it is a real transduction with
context and word order, not a word-for-word lookup. It is *not* translation: a vocabulary of about 40 words per
side, one closed grammar, sentences of at most ~20 tokens; any other English word is <unk>. With ``--data-dir``
the same code trains on the course's tab-separated sentence pairs (manythings.org/anki) of any language pair.

Text is split into words and punctuation (a hyphen is its own token: "seventy-one" -> seventy - one), lower-cased;
``detokenize`` joins them back.
"""

import re

import torch
from torch import nn

PAD_TOKEN, UNK_TOKEN, SOS_TOKEN, EOS_TOKEN = "<pad>", "<unk>", "<sos>", "<eos>"
SPECIALS = [PAD_TOKEN, UNK_TOKEN, SOS_TOKEN, EOS_TOKEN]
PAD_ID, UNK_ID, SOS_ID, EOS_ID = range(4)
WORD = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, each mark its own token ("Seventy-one," -> seventy - one ,)."""
    return WORD.findall(text.lower())


def detokenize(tokens: list[str]) -> str:
    """Tokens back to text: no space around a hyphen or an apostrophe, none before , . ! ? ; :"""
    text = " ".join(tokens)
    text = re.sub(r" ?([-']) ?", r"\1", text)
    return re.sub(r" ([,.!?;:])", r"\1", text)


def encode(tokens: list[str], index: dict[str, int]) -> list[int]:
    return [index.get(token, UNK_ID) for token in tokens]


class Attention(nn.Module):
    """Scores of the decoder state against every encoder state; "bahdanau": v . tanh(Wq q + Wk k) (additive),
    "luong": q . Wk k (dot product on projected keys). Padding gets no weight."""

    def __init__(self, hidden: int, kind: str = "bahdanau"):
        super().__init__()
        if kind not in ("bahdanau", "luong"):
            raise ValueError(f"attention {kind!r} is not bahdanau or luong")
        self.kind = kind
        self.keys = nn.Linear(hidden, hidden, bias=False)
        if kind == "bahdanau":
            self.query = nn.Linear(hidden, hidden, bias=False)
            self.v = nn.Linear(hidden, 1, bias=False)

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """The keys of the encoder states [N, S, H], computed once per sentence."""
        return self.keys(states)

    def forward(self, query, keys, states, mask):
        """query [N, H], keys and states [N, S, H], mask [N, S] (True: a real token) -> (context [N, H], weights
        [N, S])."""
        if self.kind == "bahdanau":
            scores = self.v(torch.tanh(self.query(query).unsqueeze(1) + keys)).squeeze(-1)
        else:
            scores = torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1)
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return torch.bmm(weights.unsqueeze(1), states).squeeze(1), weights


class Seq2Seq(nn.Module):
    """Embedding + bidirectional GRU encoder, attention, GRU decoder (input: previous token and context)."""

    def __init__(self, source_vocab: int, target_vocab: int, dim: int = 64, hidden: int = 128,
                 attention: str = "bahdanau", dropout: float = 0.1):
        super().__init__()
        self.embedding = nn.Embedding(source_vocab, dim, padding_idx=PAD_ID)
        self.encoder = nn.GRU(dim, hidden, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(2 * hidden, hidden)  # both directions' states -> the decoder's width
        self.init_state = nn.Linear(2 * hidden, hidden)
        self.target_embedding = nn.Embedding(target_vocab, dim, padding_idx=PAD_ID)
        self.attention = Attention(hidden, attention)
        self.decoder = nn.GRUCell(dim + hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden + dim, target_vocab)

    def encode(self, source: torch.Tensor):
        """source ids [N, S] (PAD_ID padded) -> (states [N, S, H], keys, mask [N, S], first decoder state [N, H])."""
        mask = source != PAD_ID
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.dropout(self.embedding(source)), lengths, batch_first=True,
                                                   enforce_sorted=False)
        outputs, final = self.encoder(packed)
        outputs, _ = nn.utils.rnn.pad_packed_sequence(outputs, batch_first=True, total_length=source.shape[1])
        states = torch.tanh(self.bridge(outputs))
        hidden = torch.tanh(self.init_state(torch.cat([final[0], final[1]], dim=-1)))
        return states, self.attention.project(states), mask, hidden

    def step(self, previous, hidden, states, keys, mask):
        """One decoder step: previous token ids [N] -> (log-probabilities [N, V], new state, attention [N, S])."""
        embedded = self.dropout(self.target_embedding(previous))
        context, weights = self.attention(hidden, keys, states, mask)
        hidden = self.decoder(torch.cat([embedded, context], dim=-1), hidden)
        logits = self.out(self.dropout(torch.cat([hidden, context, embedded], dim=-1)))
        return torch.log_softmax(logits, dim=-1), hidden, weights

    def forward(self, source: torch.Tensor, target_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: log-probabilities [N, T, V] of each next token given the reference's previous ones."""
        states, keys, mask, hidden = self.encode(source)
        steps = []
        for t in range(target_in.shape[1]):
            log_probs, hidden, _ = self.step(target_in[:, t], hidden, states, keys, mask)
            steps.append(log_probs)
        return torch.stack(steps, dim=1)


ARCHITECTURES = {"Seq2Seq": Seq2Seq}
"""The constructors a manifest may name (``models.architecture``)."""


@torch.inference_mode()
def greedy(model: Seq2Seq, source: torch.Tensor, max_length: int, on_token=None):
    """The most probable next token at each step, for a batch [N, S]. Returns per sentence (token ids without
    <eos>, attention [steps, S] (a row per decoded token, then one for <eos> if it came), sum of the log-probabilities
    of those steps, whether <eos> ended it (else ``max_length`` did)). ``on_token(row, id)`` is called as each token
    is decoded (streaming)."""
    states, keys, mask, hidden = model.encode(source)
    n = source.shape[0]
    previous = torch.full((n,), SOS_ID, dtype=torch.long, device=source.device)
    tokens, attention, score = [[] for _ in range(n)], [[] for _ in range(n)], [0.0] * n
    done, ended = [False] * n, [False] * n
    for _ in range(max_length + 1):
        log_probs, hidden, weights = model.step(previous, hidden, states, keys, mask)
        best = log_probs.argmax(-1)
        for row in range(n):
            if done[row]:
                continue
            token = int(best[row])
            if token != EOS_ID and len(tokens[row]) == max_length:  # out of room: this token is not emitted
                done[row] = True
                continue
            attention[row].append(weights[row].cpu())
            score[row] += float(log_probs[row, token])
            if token == EOS_ID:
                done[row] = ended[row] = True
            else:
                tokens[row].append(token)
                if on_token is not None:
                    on_token(row, token)
        if all(done):
            break
        previous = best
    return [(tokens[row], torch.stack(attention[row]), score[row], ended[row]) for row in range(n)]


@torch.inference_mode()
def beam_search(model: Seq2Seq, source: torch.Tensor, beam: int, max_length: int, alpha: float = 0.6):
    """Beam search for one sentence [1, S]: keeps the ``beam`` best partial translations by summed
    log-probability; finished ones are ranked by score / length ** ``alpha`` (GNMT's length penalty, without which
    short outputs win). Returns (token ids without <eos>, attention [len + 1, S], log-probability, whether it ended
    on <eos> before ``max_length``)."""
    states, keys, mask, hidden = model.encode(source)
    live = [([], [], 0.0)]  # (tokens, attention rows, log-probability)
    hiddens = hidden
    finished = []
    for step in range(max_length + 1):
        k = len(live)
        previous = torch.tensor([tokens[-1] if tokens else SOS_ID for tokens, _, _ in live], device=source.device)
        log_probs, hiddens, weights = model.step(previous, hiddens, states.expand(k, -1, -1),
                                                 keys.expand(k, -1, -1), mask.expand(k, -1))
        if step == max_length:  # out of room: every live hypothesis ends here
            log_probs = torch.full_like(log_probs, float("-inf"))
            log_probs[:, EOS_ID] = 0.0
        totals = (torch.tensor([score for _, _, score in live], device=log_probs.device).unsqueeze(1)
                  + log_probs).flatten()
        candidates = totals.topk(min(2 * beam, totals.numel()))
        vocab = log_probs.shape[1]
        next_live, rows = [], []
        for total, flat in zip(candidates.values.tolist(), candidates.indices.tolist()):
            row, token = divmod(flat, vocab)
            tokens, attention, _ = live[row]
            attention = attention + [weights[row].cpu()]
            if token == EOS_ID:
                finished.append((tokens, attention, total))
            else:
                next_live.append((tokens + [token], attention, total))
                rows.append(row)
            if len(next_live) == beam:
                break
        best_finished = max((score / max(1, len(t)) ** alpha for t, _, score in finished), default=float("-inf"))
        best_live = max((score / max(1, len(t)) ** alpha for t, _, score in next_live), default=float("-inf"))
        if len(finished) >= beam and best_finished >= best_live or not next_live:
            break
        live = next_live
        hiddens = hiddens[torch.tensor(rows, device=hiddens.device)]
    tokens, attention, score = max(finished, key=lambda f: f[2] / max(1, len(f[0])) ** alpha)
    return tokens, torch.stack(attention), score, len(tokens) < max_length


EXPORT_UNSUPPORTED = ("the served model is an encoder-decoder driven by a Python loop (models/translator.py greedy "
                      "and beam_search: a data-dependent number of decoder steps, beams that are pruned and "
                      "reordered, early stop on <eos>), not one graph")


def export_example(manifest: dict, batch_size: int) -> dict:
    """Nothing is exported: train/export.py traces one forward graph, and the translator's inference is a Python
    loop of decoder steps (greedy or beam search) around the encoder. Exporting the encoder and the one-step
    decoder as two graphs would need a runtime that drives the loop; the handler has none, so each format says why."""
    return {"inputs": {}, "outputs": [], "unsupported": {
        "torchscript": EXPORT_UNSUPPORTED + "; tracing would freeze one input's step count",
        "onnx": EXPORT_UNSUPPORTED + "; the ONNX exporters capture one forward pass",
        "aoti": EXPORT_UNSUPPORTED + "; AOTInductor compiles a torch.export graph of one forward pass",
    }}
