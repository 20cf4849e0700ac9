"""Caption scores: exact match, corpus BLEU-4 and CIDEr-D of generated captions against reference captions.

Tokenisation (the same for every score): lower-case, then words are the runs of letters and digits
(Unicode ``\\w`` without the underscore); punctuation and whitespace only separate words. "A red, round
Circle." and "a red round circle" are the same four words. (coco-caption runs the Stanford PTB
tokenizer in Java; this is a plain stand-in, so figures are close to, not identical with, published ones.)

* ``exact_match``: the fraction of captions whose words equal those of one of their references.
* ``corpus_bleu`` (Papineni et al. 2002): n-gram precisions pooled over the corpus, each n-gram count
  clipped to its largest count in any one reference of that caption, geometric mean of the precisions
  for n = 1..4, times the brevity penalty exp(1 - r/c) when the total caption length c is not above r,
  the sum of the reference lengths closest to each caption's length (the shorter on a tie). No
  smoothing: a corpus without any matching 4-gram scores 0.
* ``cider_d`` (Vedantam et al. 2015, as coco-caption's CIDEr-D computes it): every caption and reference
  is a tf-idf vector of its n-grams per n = 1..4, with document frequencies counted over the reference
  sets (an n-gram counts once per image); for each reference, the cosine similarity per n with the
  caption's weights clipped to the reference's, times the Gaussian length penalty
  exp(-(len_c - len_r)² / (2·6²)); averaged over n and references, times 10, then over the corpus.
  Lengths are counted as coco-caption does (bigrams per sentence). The idf of an n-gram found in every
  reference set is 0, so a corpus of a single image, or one whose captions are all alike, scores 0.

Each function takes ``hypotheses`` (one string per image) and ``references`` (per image, one string or a
list of strings).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

BLEU_N = 4
CIDER_N = 4
CIDER_SIGMA = 6.0
_WORD = re.compile(r"[^\W_]+")

Refs = Sequence[str | Sequence[str]]


def tokenize(text: str) -> list[str]:
    """The words of ``text``: lower-case runs of letters and digits."""
    return _WORD.findall(text.lower())


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _reference_lists(hypotheses: Sequence[str], references: Refs) -> list[list[str]]:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} captions but {len(references)} reference sets; give one set per caption")
    out = []
    for r in references:
        refs = [r] if isinstance(r, str) else list(r)
        if not refs:
            raise ValueError("every caption needs at least one reference")
        out.append(refs)
    return out


def exact_match(hypotheses: Sequence[str], references: Refs) -> float:
    """Fraction of captions whose words equal those of one of their references (0 for an empty corpus)."""
    refs = _reference_lists(hypotheses, references)
    hits = sum(any(tokenize(h) == tokenize(r) for r in rs) for h, rs in zip(hypotheses, refs))
    return hits / len(hypotheses) if hypotheses else 0.0


def corpus_bleu(hypotheses: Sequence[str], references: Refs, max_n: int = BLEU_N) -> float:
    """Corpus BLEU-``max_n`` in [0, 1] (0 for an empty corpus)."""
    refs = _reference_lists(hypotheses, references)
    matched = [0] * max_n
    total = [0] * max_n
    hyp_len = ref_len = 0
    for h, rs in zip(hypotheses, refs):
        words = tokenize(h)
        ref_words = [tokenize(r) for r in rs]
        hyp_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, max_n + 1):
            most = Counter()
            for r in ref_words:
                most |= _ngrams(r, n)  # the largest count of each n-gram in any one reference
            matched[n - 1] += sum(min(c, most[g]) for g, c in _ngrams(words, n).items())
            total[n - 1] += max(0, len(words) - n + 1)
    if hyp_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def _tfidf(counts: Counter, df: Counter, log_docs: float, max_n: int) -> tuple[list[dict], list[float], int]:
    """(weights per n, their l2 norms, length) of one sentence's n-gram counts."""
    vec: list[dict] = [{} for _ in range(max_n)]
    for gram, tf in counts.items():
        vec[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)  # coco-caption's length: bigrams
    return vec, norms, length


def _all_ngrams(text: str, max_n: int) -> Counter:
    words = tokenize(text)
    out = Counter()
    for n in range(1, max_n + 1):
        out.update(_ngrams(words, n))
    return out


def cider_d_scores(hypotheses: Sequence[str], references: Refs, max_n: int = CIDER_N,
                   sigma: float = CIDER_SIGMA) -> list[float]:
    """CIDEr-D of each caption (document frequencies from all of ``references``)."""
    refs = _reference_lists(hypotheses, references)
    ref_counts = [[_all_ngrams(r, max_n) for r in rs] for rs in refs]
    df = Counter()
    for counts in ref_counts:
        df.update({gram for c in counts for gram in c})  # once per image, however many of its references have it
    log_docs = math.log(len(refs)) if refs else 0.0
    scores = []
    for h, counts in zip(hypotheses, ref_counts):
        vec, norms, length = _tfidf(_all_ngrams(h, max_n), df, log_docs, max_n)
        total = 0.0
        for c in counts:
            rvec, rnorms, rlength = _tfidf(c, df, log_docs, max_n)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma ** 2))
            for n in range(max_n):
                dot = sum(min(w, rvec[n].get(g, 0.0)) * rvec[n].get(g, 0.0) for g, w in vec[n].items())
                if norms[n] and rnorms[n]:
                    dot /= norms[n] * rnorms[n]
                total += dot * penalty
        scores.append(10.0 * total / max_n / len(counts))
    return scores


def cider_d(hypotheses: Sequence[str], references: Refs, max_n: int = CIDER_N, sigma: float = CIDER_SIGMA) -> float:
    """Corpus CIDEr-D: the mean of ``cider_d_scores`` (0 for an empty corpus; at most 10)."""
    scores = cider_d_scores(hypotheses, references, max_n, sigma)
    return sum(scores) / len(scores) if scores else 0.0
