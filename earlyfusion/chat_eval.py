"""Held-out conversations scored: answers to questions about one picture and about two, and edits.

Every answer of a held-out conversation is asked for after the conversation's own turns before it (the true earlier
answers, so that one wrong answer does not spoil the next) and generated greedily, text or pictures as the model
chooses. A text answer is right when it equals the expected one (case, blanks and a final full stop aside); a picture
answer when it is one picture and, for the built-in data (each picture's caption beside it), the built-in judge reads
back exactly the expected scene from it, attribute by attribute.

Figures: ``answer_exact_match`` (every answer), BLEU-4 and CIDEr-D of the text answers; with the built-in data's
kinds, ``vqa_exact_match`` (questions about one picture) and its accuracy per kind, ``multi_image_accuracy``
(questions about two pictures) and ``edit_accuracy`` (edits answered with the right picture).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from earlyfusion.core.logs import log, progress
from earlyfusion.sampling.chat import answer
from earlyfusion.sampling.cli import encode_image_files
from earlyfusion.scores import corpus_bleu, cider_d
from earlyfusion.training.data.conversations import ANSWER, conversation_records
from earlyfusion.training.data.records import SkipReport
from earlyfusion.training.shapes import parse_caption
from earlyfusion.training.shapes_chat import EDIT_KINDS, QUESTION_KINDS, TWO_IMAGE_KINDS
from earlyfusion.training.shapes_judge import recognise

BATCH = 16  # answers generated together
CONVERSATIONS_TEST = "conversations_test.json"  # held-out conversations beside a data directory's splits


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".").strip()


def _text_of(sample) -> str:
    return "".join(x for x in sample.segments if isinstance(x, str)).strip()


def read_conversations(path: Path, limit: int = 0) -> tuple[list, SkipReport]:
    """The readable conversations of the file ``path`` (at most ``limit``; 0: all), read once, and the report of
    those skipped, logged by reason where some were read (where none was, the caller's error says why)."""
    report = SkipReport()
    records = list(conversation_records(path, report))[:limit or None]
    if report.total and records:
        log.warning("%s: %s", path, report.summary())
    return records, report


def conversation_figures(decoder, vocab, vq, records: list, *, out: Path | None = None) -> dict:
    """The figures of the module docstring for ``records`` (``read_conversations``'); drawn answers written to
    ``out`` when given."""
    codes: dict[str, object] = {}

    def grid(p: str):
        if p not in codes:
            codes[p] = encode_image_files(vq, vocab, [p])[0]
        return codes[p]

    asks = []  # (conversation prefix, expected turn, kind, expected scene or None)
    for _, record, turns in records:
        captions = record.get("captions") if isinstance(record.get("captions"), list) else None
        seen_images = 0
        for i, turn in enumerate(turns):
            images = [x for k, x in turn.segments if k == "i"]
            if turn.role == ANSWER:
                scene = None
                if images and captions and seen_images < len(captions):
                    scene = parse_caption(captions[seen_images])
                asks.append(([(t.role, [(k, x if k == "t" else grid(x)) for k, x in t.segments]) for t in turns[:i]],
                             turn, turn.kind, scene))
            seen_images += len(images)
    right: dict[str, list[bool]] = defaultdict(list)
    hyps, refs = [], []
    with progress(total=len(asks), desc="conversations") as bar:
        for a in range(0, len(asks), BATCH):
            chunk = asks[a:a + BATCH]
            samples = answer(decoder, vocab, [prefix for prefix, *_ in chunk], vq=vq)
            for j, ((_, turn, kind, scene), s) in enumerate(zip(chunk, samples)):
                want_images = [x for k, x in turn.segments if k == "i"]
                if out is not None and s.images:  # every drawn answer, expected or not; named by the ask's index
                    out.mkdir(parents=True, exist_ok=True)
                    for k, image in enumerate(s.images):
                        image.save(out / f"answer-{a + j:05d}{f'-{k}' if k else ''}.png")
                if want_images:
                    ok = len(s.images) == 1 and not _text_of(s) and \
                        (scene is None or recognise(s.images[0]) == scene)
                else:
                    want = " ".join(x for k, x in turn.segments if k == "t")
                    ok = not s.images and _norm(_text_of(s)) == _norm(want)
                    hyps.append(_text_of(s))
                    refs.append([want])
                right["all"].append(ok)
                right[kind or "unlabelled"].append(ok)
            bar.update(len(chunk))
    share = {k: sum(v) / len(v) for k, v in right.items() if v}

    def mean_of(kinds) -> float | None:
        hits = [x for k in kinds for x in right.get(k, [])]
        return sum(hits) / len(hits) if hits else None

    figures = {"conversations": len(records), "answers": len(right["all"]), "answer_exact_match": share.get("all"),
               "answer_bleu4": corpus_bleu(hyps, refs) if hyps else None,
               "answer_cider_d": cider_d(hyps, refs) if hyps else None,
               "vqa_exact_match": mean_of(QUESTION_KINDS), "multi_image_accuracy": mean_of(TWO_IMAGE_KINDS),
               "edit_accuracy": mean_of(EDIT_KINDS)}
    figures["answer_accuracy_by_kind"] = {k: v for k, v in sorted(share.items()) if k != "all"}
    return figures
