"""How a conversation becomes tokens, and which of them are trained: the chat template.

    <s> <user> question… <eot> <assistant> answer… <eot> <user> … <eot> <assistant> … <eot> </s>

A turn is its role's marker, its text and image spans in order (an image span as the vocabulary writes it), and
``<eot>``. The markers are the vocabulary's own special tokens (``vocab build`` adds them for data with conversations),
so no text can spell one. A vocabulary imported from Chameleon or Anole keeps their own template, which has no role
markers and ends each turn with their end-of-turn token (as their inference code does):

    <s> question… <reserved08706> answer… <reserved08706> … </s>

Only the assistant's turns are trained, by default for conversations: the loss falls on
each answer's tokens and its ``<eot>`` (the model learns to stop), and on the final ``</s>``; the questions, the
pictures asked about and the markers before an answer only condition it.
"""

from __future__ import annotations

import numpy as np

from .conversations import ANSWER, ASK


def conversation_document(vocab, turns: list[tuple[str, list[tuple[str, np.ndarray]]]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, trained bool) of a conversation: ``turns`` as (``ASK`` or ``ANSWER``, pieces ("t", text ids) |
    ("i", code grid (h, w))); ``trained[j]``: whether token j is a target that gets loss."""
    marker = {ASK: vocab.chat_id("user"), ANSWER: vocab.chat_id("assistant")}
    eot = vocab.chat_id("eot")
    ids: list[np.ndarray] = [np.asarray([vocab.bos], np.int32)]
    trained: list[np.ndarray] = [np.zeros(1, bool)]
    for role, pieces in turns:
        body = [np.asarray(x, np.int32) if k == "t" else np.asarray(vocab.image_span(x), np.int32) for k, x in pieces]
        start = [] if marker[role] is None else [marker[role]]
        turn = np.concatenate([np.asarray(start, np.int32), *body, np.asarray([eot], np.int32)])
        mask = np.full(len(turn), role == ANSWER)
        mask[:len(start)] = False  # the marker itself is given: who speaks is not the model's to guess
        ids.append(turn)
        trained.append(mask)
    ids.append(np.asarray([vocab.eos], np.int32))
    trained.append(np.ones(1, bool))
    return np.concatenate(ids), np.concatenate(trained)
