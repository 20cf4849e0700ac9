"""Caption scores (earlyfusion/scores.py): BLEU-4 and CIDEr-D against cases computed by hand, and invariants."""

from __future__ import annotations

import math
import random

import pytest

from earlyfusion.scores import cider_d, cider_d_scores, corpus_bleu, exact_match, tokenize


def test_tokenize_lower_cases_and_drops_punctuation():
    assert tokenize("A red, round Circle.") == ["a", "red", "round", "circle"]
    assert tokenize("  two_cats on 3 sofas!! ") == ["two", "cats", "on", "3", "sofas"]
    assert tokenize("...") == []


def test_exact_match_uses_the_words():
    hyps = ["A red circle.", "a blue square", "a red circle"]
    refs = ["a red circle", "a green square", ["a big circle", "A red CIRCLE"]]
    assert exact_match(hyps, refs) == pytest.approx(2 / 3)
    assert exact_match([], []) == 0.0


# ---------------------------------------------------------------- BLEU


def test_bleu_identical_captions_is_one():
    caps = ["the cat sat on the mat", "a small red circle at the top left"]
    assert corpus_bleu(caps, caps) == pytest.approx(1.0)
    assert corpus_bleu([c.upper() + "." for c in caps], caps) == pytest.approx(1.0)  # tokenisation


def test_bleu_partial_overlap_by_hand():
    hyps = ["the cat sat on the mat", "a red circle on the left"]
    refs = ["the cat is on the mat", "a red circle on the left"]
    # matched / total n-grams, first sentence + second (identical) one:
    # 1-grams: the x2, cat, on, mat (not sat) = 5 of 6, + 6 of 6
    # 2-grams: "the cat", "on the", "the mat" = 3 of 5, + 5 of 5
    # 3-grams: "on the mat" = 1 of 4, + 4 of 4
    # 4-grams: none of 3, + 3 of 3; equal lengths: no brevity penalty
    p = [11 / 12, 8 / 10, 5 / 8, 3 / 6]
    assert corpus_bleu(hyps, refs) == pytest.approx(math.prod(p) ** 0.25)
    # alone, the first sentence has no matching 4-gram: BLEU-4 is 0 (no smoothing)
    assert corpus_bleu(hyps[:1], refs[:1]) == 0.0


def test_bleu_clips_repeated_words():
    # Papineni et al.'s example: "the" x7 against a reference with two "the": modified unigram precision 2/7
    assert corpus_bleu(["the the the the the the the"], ["the cat is on the mat"], max_n=1) == pytest.approx(2 / 7)


def test_bleu_brevity_penalty_by_hand():
    # a 4-word prefix of a 6-word reference: every precision is 1, the penalty exp(1 - 6/4)
    assert corpus_bleu(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(math.exp(-0.5))
    # with a 3-word reference too the closest reference length is 3 < 4: no penalty
    assert corpus_bleu(["the cat sat on"], [["the cat sat on the mat", "a cat sat"]]) == pytest.approx(1.0)
    # a tie in distance (3 and 5 against 4) takes the shorter: again no penalty
    assert corpus_bleu(["the cat sat on"], [["the cat sat on it", "one two three"]]) == pytest.approx(1.0)


def test_bleu_invariants():
    rng = random.Random(0)
    words = "a the red blue circle square on left right top small large".split()
    refs = [[rng.choice(words) for _ in range(rng.randint(5, 9))] for _ in range(20)]
    hyps = [r[:rng.randint(3, len(r))] for r in refs]  # a prefix of the reference, one word changed
    for h in hyps:
        h[rng.randrange(len(h))] = rng.choice(words)
    refs, hyps = [" ".join(r) for r in refs], [" ".join(h) for h in hyps]
    score = corpus_bleu(hyps, refs)
    assert 0.0 < score < 1.0
    order = list(range(20))
    rng.shuffle(order)
    assert corpus_bleu([hyps[i] for i in order], [refs[i] for i in order]) == pytest.approx(score)
    assert corpus_bleu([], []) == 0.0
    assert corpus_bleu([""], ["a red circle"]) == 0.0
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])


# ---------------------------------------------------------------- CIDEr-D


def test_cider_by_hand():
    refs = ["a red circle", "a blue square"]
    # 2 images: idf of an n-gram in one of them is log 2, of "a" (in both) 0.
    # Identical caption: cosine 1 for n = 1, 2, 3; no 4-grams (0): 10 * 3/4
    assert cider_d_scores(refs, refs) == pytest.approx([7.5, 7.5])
    # "a red square" vs "a blue square": unigrams share "square" (cos 1/2); no shared bigram or trigram
    assert cider_d_scores(["a red circle", "a red square"], refs) == pytest.approx([7.5, 10 * 0.5 / 4])
    assert cider_d(["a red circle", "a red square"], refs) == pytest.approx((7.5 + 1.25) / 2)
    # "red circle" vs "a red circle": unigram cos 1, bigram cos 1/sqrt(2), no trigram; one bigram fewer:
    # length penalty exp(-1 / (2 * 6^2))
    want = 10 * (1 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert cider_d_scores(["red circle", "a blue square"], refs) == pytest.approx([want, 7.5])


def test_cider_clips_repeated_ngrams():
    refs = ["a red circle", "a blue square"]
    # "red red circle": unigram weights 2L (red) and L (circle) against L and L, clipped to L each:
    # dot 2L^2 over norms sqrt(5)L * sqrt(2)L; bigram "red circle" shared: L^2 / (sqrt(2)L * sqrt(2)L) = 1/2;
    # no shared trigram; same number of bigrams (2) as the reference
    want = 10 * (2 / math.sqrt(10) + 0.5) / 4
    assert cider_d_scores(["red red circle", "a blue square"], refs)[0] == pytest.approx(want)


def test_cider_invariants():
    rng = random.Random(1)
    words = "a the red blue circle square on left right top small large".split()
    refs = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 8))) for _ in range(15)]
    hyps = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) for _ in range(15)]
    scores = cider_d_scores(hyps, refs)
    assert all(0.0 <= s <= 10.0 for s in scores)
    order = list(range(15))
    rng.shuffle(order)
    assert cider_d([hyps[i] for i in order], [refs[i] for i in order]) == pytest.approx(sum(scores) / 15)
    # the references themselves score at least as well as any other caption of the same image
    perfect = cider_d_scores(refs, refs)
    assert all(p >= s - 1e-9 for p, s in zip(perfect, scores))
    # a single image (idf 0 everywhere) and an empty corpus score 0
    assert cider_d(["a red circle"], ["a red circle"]) == 0.0
    assert cider_d([], []) == 0.0
    # several references per image: the mean over them
    two = cider_d_scores(["a red circle", "a blue square"], [["a red circle", "a red circle"], ["a blue square"]])
    assert two == pytest.approx([7.5, 7.5])
