"""Train the translator (models.translator.Seq2Seq: GRU encoder, attention, GRU decoder) and write its artifact folder.

Default data (offline; no parallel corpus ships in an installable package here): English number names -> French
number names, both written by ``num2words`` for numbers drawn from 0..999,999 (half uniformly, half with a uniform
number of digits, so that small numbers are common too). The held-out split is by number: no held-out number, in
either language, is seen in training. What this learns, and how far it is from translation: models/translator.py
and docs/models/translator.md.

``--data-dir DIR`` trains on the course's sentence pairs instead: every ``*.txt`` file of DIR, one pair a line in
manythings.org/anki's format, ``source<TAB>target[<TAB>attribution]`` (any language pair); the held-out split is
by source sentence.

Training uses teacher forcing (the reference's previous token as the decoder's input). Evaluation on the held-out
split: BLEU (0..1: sacrebleu's corpus_bleu / 100, with tokenize="none" on the model's own tokens, where a hyphen is a
token; 13a would keep "quatre-vingt-dix-sept" one word and leave most of these short sentences without a 4-gram) and
exact match ("em") of the detokenised text, for greedy decoding and for beam search (``--beam``), into metrics.json.

    python -m train.translator --out artifacts/translator --threads 1
"""

import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from models import architecture, build
from models.translator import (EOS_ID, PAD_ID, SOS_ID, SPECIALS, beam_search, detokenize, encode, greedy,
                               tokenize)
from train.common import (DataError, build_parser, fit, metrics_record, positive_int, run_cli, seed_everything,
                          shuffled_batches, write_artifacts)

MAX_NUMBER = 999_999
MAX_BEAM = 8
"""The widest beam the handler accepts (a request's ``beam``)."""


def number_pairs(count: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """``count`` distinct numbers of 0..MAX_NUMBER as (English, French) names, in a random order."""
    from num2words import num2words

    chosen, numbers = set(), []
    while len(numbers) < count:
        if rng.random() < 0.5:
            number = int(rng.integers(0, MAX_NUMBER + 1))
        else:
            digits = int(rng.integers(1, 7))
            number = int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits))
        if number not in chosen:
            chosen.add(number)
            numbers.append(number)
    numbers = [numbers[i] for i in rng.permutation(len(numbers))]  # the first drawn are the small ones: shuffle
    return [(num2words(n, lang="en"), num2words(n, lang="fr")) for n in numbers]


def read_pairs(folder: Path) -> list[tuple[str, str]]:
    """Every ``source<TAB>target[<TAB>...]`` line of the ``*.txt`` files of ``folder``, distinct sources only."""
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        raise DataError(f"--data-dir {folder}: no *.txt pair files there")
    pairs, seen = [], set()
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
                raise DataError(f"{path}, line {number}: expected source<TAB>target[<TAB>attribution]")
            if fields[0] not in seen:
                seen.add(fields[0])
                pairs.append((fields[0].strip(), fields[1].strip()))
    if len(pairs) < 2:
        raise DataError(f"--data-dir {folder}: {len(pairs)} pair(s); at least 2 are needed (one held out)")
    return pairs


def vocabulary(sentences: list[list[str]], min_count: int) -> list[str]:
    counts = Counter(token for tokens in sentences for token in tokens)
    return SPECIALS + sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))


def evaluate(model, sources: list[list[int]], references: list[str], target_vocab: list[str], max_length: int,
             beam: int) -> dict[str, float]:
    """Held-out BLEU (0..1: sacrebleu's score / 100) and exact match ("em") of greedy decoding and, with ``beam`` >
    1, of beam search: bleu_greedy, em_greedy, bleu_beam, em_beam."""
    from sacrebleu import corpus_bleu

    model.eval()
    hypotheses = {"greedy": []}
    for start in range(0, len(sources), 256):
        batch = pad_sequence([torch.tensor(ids) for ids in sources[start:start + 256]], batch_first=True,
                             padding_value=PAD_ID)
        hypotheses["greedy"] += [ids for ids, *_ in greedy(model, batch, max_length)]
    if beam > 1:
        hypotheses["beam"] = [beam_search(model, torch.tensor([ids]), beam, max_length)[0] for ids in sources]
    figures = {}
    spaced = [" ".join(tokenize(r)) for r in references]  # BLEU on the model's tokens: hyphens are words here
    for name, decoded in hypotheses.items():
        words = [[target_vocab[i] for i in ids] for ids in decoded]
        figures[f"bleu_{name}"] = corpus_bleu([" ".join(w) for w in words], [spaced], tokenize="none").score / 100
        figures[f"em_{name}"] = float(np.mean([detokenize(w) == r for w, r in zip(words, references)]))
    return figures


def add_seq2seq_options(parser, dim: int = 64, hidden: int = 128):
    """The seq2seq model's and training's options (what ``fit_and_write`` reads), with these widths by default."""
    parser.add_argument("--min-count", type=positive_int, default=1,
                        help="tokens seen fewer times in training are <unk> (default %(default)s)")
    parser.add_argument("--attention", choices=["bahdanau", "luong"], default="bahdanau")
    parser.add_argument("--dim", type=positive_int, default=dim, help="embedding width (default %(default)s)")
    parser.add_argument("--hidden", type=positive_int, default=hidden, help="GRU width (default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--beam", type=int, choices=range(2, MAX_BEAM + 1), default=4,
                        help="beam width of the held-out evaluation (default %(default)s)")


def fit_and_write(name: str, module: str, pairs: list[tuple[str, str]], args, generator: torch.Generator,
                  dataset: dict) -> dict:
    """Build the ``Seq2Seq`` of ``module``, train it on ``pairs`` (source, target) with teacher forcing, the first
    ``args.test_fraction`` held out, evaluate it (``evaluate``) and write ``args.out``: the manifest (naming
    ``name``), both vocabularies and metrics.json. Returns the metrics."""
    held_out = min(len(pairs) - 1, max(1, int(len(pairs) * args.test_fraction)))
    test_pairs, train_pairs = pairs[:held_out], pairs[held_out:]
    source_tokens = [tokenize(s) for s, _ in train_pairs]
    target_tokens = [tokenize(t) for _, t in train_pairs]
    source_vocab = vocabulary(source_tokens, args.min_count)
    target_vocab = vocabulary(target_tokens, args.min_count)
    source_index = {t: i for i, t in enumerate(source_vocab)}
    target_index = {t: i for i, t in enumerate(target_vocab)}
    sources = [torch.tensor(encode(tokens, source_index) or [PAD_ID]) for tokens in source_tokens]
    targets = [torch.tensor([SOS_ID, *encode(tokens, target_index), EOS_ID]) for tokens in target_tokens]
    max_source = max(len(tokens) for tokens in source_tokens)
    max_target = max(len(tokens) for tokens in target_tokens)
    max_length = 2 * max_target + 2  # the decoding limit: room for a longer input's translation
    test_sources = [encode(tokenize(s), source_index) or [PAD_ID] for s, _ in test_pairs]
    test_references = [detokenize(tokenize(t)) for _, t in test_pairs]

    spec = architecture(module, "Seq2Seq", source_vocab=len(source_vocab), target_vocab=len(target_vocab),
                        dim=args.dim, hidden=args.hidden, attention=args.attention)
    model = build(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * -(-len(sources) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    loss_fn = torch.nn.NLLLoss(ignore_index=PAD_ID)

    def run_epoch() -> float:
        model.train()
        total, seen = 0.0, 0
        for indices in shuffled_batches(len(sources), args.batch_size, generator):
            source = pad_sequence([sources[i] for i in indices], batch_first=True, padding_value=PAD_ID)
            target = pad_sequence([targets[i] for i in indices], batch_first=True, padding_value=PAD_ID)
            log_probs = model(source, target[:, :-1])  # teacher forcing
            loss = loss_fn(log_probs.reshape(-1, log_probs.shape[-1]), target[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(indices)
            seen += len(indices)
        return total / seen

    def quick_evaluate() -> dict[str, float]:  # greedy on the first 200 held-out pairs, each epoch
        return evaluate(model, test_sources[:200], test_references[:200], target_vocab, max_length, beam=1)

    _, seconds = fit(args.epochs, run_epoch, quick_evaluate)
    started = time.perf_counter()
    test = evaluate(model, test_sources, test_references, target_vocab, max_length, args.beam)
    print("held-out " + "  ".join(f"{k} {v:.4f}" for k, v in test.items())
          + f"  ({len(test_sources)} pairs, beam {args.beam}, {time.perf_counter() - started:.1f}s)", flush=True)
    manifest = {"model": name, **spec, "source_vocab": "source_vocab.json",
                "target_vocab": "target_vocab.json", "max_source_tokens": max(32, 2 * max_source),
                "max_target_tokens": max_length, "max_beam": MAX_BEAM, "default_beam": 1}
    dataset = {**dataset, "n_train": len(train_pairs), "n_test": len(test_pairs), "beam": args.beam,
               "bleu": "sacrebleu corpus_bleu / 100 on the model's tokens "
                       "(hyphens, punctuation split; tokenize='none')"}
    metrics = metrics_record(name, dataset, args, seconds, test)
    write_artifacts(args.out, model, manifest, metrics,
                    extra_files={"source_vocab.json": source_vocab, "target_vocab.json": target_vocab})
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser(__doc__.splitlines()[0], default_out="artifacts/translator", default_epochs=4)
    parser.set_defaults(test_fraction=0.05)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder of manythings.org/anki pair files (*.txt); default: number names, num2words")
    parser.add_argument("--pairs", type=positive_int, default=24000,
                        help="number pairs to draw without --data-dir (default %(default)s)")
    parser.add_argument("--max-tokens", type=positive_int, default=20,
                        help="with --data-dir: leave out pairs longer than this many tokens (default %(default)s)")
    add_seq2seq_options(parser)
    args = parser.parse_args(argv)
    generator = seed_everything(args.seed, threads=args.threads)
    rng = np.random.default_rng(args.seed)
    if args.data_dir is None:
        pairs = number_pairs(args.pairs, rng)
        dataset = {"name": "English -> French number names (num2words 0.5.14), numbers 0..999,999"}
    else:
        pairs = read_pairs(args.data_dir)
        pairs = [pairs[i] for i in rng.permutation(len(pairs))]
        pairs = [p for p in pairs if max(len(tokenize(p[0])), len(tokenize(p[1]))) <= args.max_tokens] or pairs[:2]
        dataset = {"name": f"sentence pairs of {args.data_dir}"}
    if args.limit:
        pairs = pairs[:args.limit]
    return fit_and_write("translator", "models.translator", pairs, args, generator, dataset)

if __name__ == "__main__":
    run_cli(main)
