"""Talking with a model trained on conversations: the next answer to the turns so far.

The prompt is the conversation written with the training template (``training.data.chat_template``) up to the
``<assistant>`` marker of the answer to come; the answer is sampled until its ``<eot>``. It may hold text and
pictures (``modality="auto"``: the model opens an image span where it answers with a picture, as it learnt to for
edits), or be held to one of them. Used by ``sample --chat`` and by evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from earlyfusion.sampling.generate import Sample, SamplingConfig, generate_ids
from earlyfusion.training.data.chat_template import conversation_document
from earlyfusion.training.data.conversations import ANSWER, ASK

Turn = tuple[str, Sequence[tuple[str, object]]]
"""(``ASK`` or ``ANSWER``, pieces in order: ("t", text) or ("i", an (h, w) code grid))."""


def chat_prompt(vocab, turns: Sequence[Turn]) -> list[int]:
    """The ids of ``turns`` (ending with a question) as training writes them, then ``<assistant>`` (an imported
    Chameleon's template has no role markers: the question's end of turn is the prompt's last id)."""
    if not turns or turns[-1][0] != ASK:
        raise ValueError("a conversation prompt ends with a question")
    texts = vocab.encode_texts([x for _, pieces in turns for k, x in pieces if k == "t"])
    it = iter(texts)
    encoded = [(role, [("t", np.asarray(next(it), np.int64)) if k == "t" else ("i", np.asarray(x))
                       for k, x in pieces]) for role, pieces in turns]
    ids, _ = conversation_document(vocab, encoded)
    assistant = vocab.chat_id("assistant")  # None: a template without role markers (an imported Chameleon's)
    return [int(i) for i in ids[:-1]] + ([] if assistant is None else [assistant])  # without the closing </s>


def answer(decoder, vocab, conversations: Sequence[Sequence[Turn]], *, vq=None, modality: str = "auto",
           max_new_tokens: int | None = None, image_temperature: float = 0.0, seed: int = 0) -> list[Sample]:
    """The next answer of each conversation: greedy text, images drawn at ``image_temperature`` (0: greedy) without
    guidance, until ``<eot>``; decoded to PIL with ``vq`` when given."""
    config = SamplingConfig(modality=modality, temperature=0.0, cfg=None if modality == "text" else 1.0, seed=seed,
                            image_temperature=image_temperature, max_new_tokens=max_new_tokens)
    prompts = [chat_prompt(vocab, turns) for turns in conversations]
    return generate_ids(decoder, vocab, prompts, config, vq=vq, stop=[vocab.chat_id("eot")])


def reply_turn(sample: Sample) -> Turn:
    """An answer as a turn of the conversation, to ask the next question after it."""
    pieces = [("t", s) if isinstance(s, str) else ("i", s) for s in sample.segments]
    return ANSWER, [(k, x) for k, x in pieces if k == "i" or str(x).strip()]


CHAT_HELP = ("a conversation: type a question and press Enter; '/image PATH' attaches a picture to your next "
             "question, '/reset' starts over, an empty line or Ctrl-D ends")


def chat_session(run, encode_image, out, *, read=input, write=print, image_temperature: float = 0.0,
                 seed: int = 0, max_new_tokens: int | None = None, pictures_first: bool = False) -> int:
    """``sample --chat``: questions read line by line (``read``), answers written (``write``) as text, pictures
    saved to ``out`` as PNGs; ``encode_image(path)`` -> code grid (a bad file is one line and the session goes on).
    A question's attached pictures follow its text (``pictures_first``: precede it). Returns the number of answers."""
    vocab = run.vocab
    vocab.chat_id("eot")  # a run whose vocabulary has no conversation markers: one line before anything else
    write(CHAT_HELP)
    turns: list[Turn] = []
    attached: list = []
    answers = pictures = 0
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            turns, attached = [], []
            write("(a new conversation)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                attached.append(encode_image(path))
            except Exception as e:  # noqa: BLE001 - any unreadable file is one line; the conversation goes on
                write(f"cannot use {path or 'the picture'}: {' '.join(str(e).split()) or type(e).__name__}")
                continue
            write(f"(picture {len(attached)} attached to your next question)")
            continue
        pictures = [("i", g) for g in attached]
        turns.append((ASK, pictures + [("t", line)] if pictures_first else [("t", line)] + pictures))
        attached = []
        sample = answer(run.decoder, vocab, [turns], vq=run.vq, image_temperature=image_temperature, seed=seed,
                        max_new_tokens=max_new_tokens)[0]
        answers += 1
        parts = []
        for k, segment in enumerate(sample.segments):
            if isinstance(segment, str):
                parts.append(segment.strip())
                continue
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"answer-{answers:03d}-{k}.png"
            sample.images[sum(not isinstance(s, str) for s in sample.segments[:k])].save(path)
            pictures += 1
            parts.append(f"[picture: {path}]")
        write("model> " + " ".join(p for p in parts if p))
        turns.append(reply_turn(sample))
    return answers
