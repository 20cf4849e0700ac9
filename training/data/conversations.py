"""Conversations in LLaVA's JSON format, read by the records rules: a bad conversation is skipped and counted.

A file holds a JSON array of records (LLaVA's ``.json``) or one record per line (``.jsonl``)::

    {"id": "...", "image": "a.png" | ["a.png", "b.png"] | "images": [...],
     "conversations": [{"from": "human", "value": "<image>\\nwhat colour is the circle?"},
                       {"from": "gpt", "value": "red"}, ...]}

Each ``<image>`` marker in a turn stands for the next of the record's images, in order; an answer may hold one (an
answer with a picture, as Anole answers). Roles "human" / "user" ask and "gpt" / "assistant" answer. Paths are
relative to the file's folder and must stay inside it (unless ``allow_outside``).

Skipped and counted, by reason: ``bad_json`` (a line or file that is not JSON), ``bad_record`` (not an object, no
``conversations`` list, a turn without a known role or a string value), ``turn_order`` (not human / gpt in turn,
starting with a question and ending with an answer), ``empty_answer``, ``image_count`` (more or fewer ``<image>``
markers than images), ``outside_data_dir``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .records import Inside, SkipReport, jsonl_records, outside_detail, parse_json, read_file

IMAGE_MARKER = "<image>"
ASK, ANSWER = "user", "assistant"
ROLES = {"human": ASK, "user": ASK, "gpt": ANSWER, "assistant": ANSWER}


@dataclass(frozen=True)
class Turn:
    role: str
    """``ASK`` or ``ANSWER``."""
    segments: tuple[tuple[str, str], ...]
    """("t", text) and ("i", absolute image path) in order; text around a marker keeps no surrounding blanks."""
    kind: str | None = None
    """The record's own label of an answer (the built-in data's question kinds), if any."""


def picture_order(turns: Iterable[Turn]) -> Counter:
    """How the questions among ``turns`` that hold both text and pictures order them: counts of "question first"
    (text before the first picture) and "pictures first"."""
    order = Counter()
    for t in turns:
        kinds = [k for k, _ in t.segments]
        if t.role == ASK and "t" in kinds and "i" in kinds:
            order["question first" if kinds.index("t") < kinds.index("i") else "pictures first"] += 1
    return order


def _records(path: Path, report: SkipReport) -> Iterator[tuple[str, object]]:
    if path.suffix == ".jsonl":
        yield from jsonl_records(path, report)
        return
    try:
        data = parse_json(read_file(path))
    except ValueError as e:
        report.add("bad_json", str(path), str(e))
        return
    if not isinstance(data, list):
        report.add("bad_record", str(path), "expected a JSON array of conversations")
        return
    for i, obj in enumerate(data):
        yield f"{path}[{i}]", obj


def _images_of(obj: dict) -> list | None:
    images = obj.get("images", obj.get("image", []))
    images = [images] if isinstance(images, str) else images
    return images if isinstance(images, list) and all(isinstance(x, str) and x.strip() for x in images) else None


def _segments(value: str, images: Iterator[str]) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for k, text in enumerate(value.split(IMAGE_MARKER)):
        if k:
            out.append(("i", next(images)))
        if text.strip():
            out.append(("t", text.strip()))
    return tuple(out)


def conversation_records(path: Path, report: SkipReport, allow_outside: bool = False
                         ) -> Iterator[tuple[str, dict, list[Turn]]]:
    """(where, the record, its turns) of each good conversation of ``path`` (see the module docstring)."""
    base = path.parent
    inside = Inside(base)
    for where, obj in _records(path, report):
        turns = obj.get("conversations") if isinstance(obj, dict) else None
        images = _images_of(obj) if isinstance(obj, dict) else None
        if not isinstance(turns, list) or images is None:
            report.add("bad_record", where, "needs a 'conversations' list and image paths as 'image' or 'images'")
            continue
        if not all(isinstance(t, dict) and t.get("from") in ROLES and isinstance(t.get("value"), str) for t in turns):
            report.add("bad_record", where, "each turn needs 'from' (human or gpt) and a string 'value'")
            continue
        roles = [ROLES[t["from"]] for t in turns]
        if not roles or roles != [ASK, ANSWER] * (len(roles) // 2) or len(roles) % 2:
            report.add("turn_order", where, f"turns {' / '.join(t['from'] for t in turns) or 'none'}: a question, an "
                                            "answer, and so on, ending with an answer")
            continue
        if any(r == ANSWER and not t["value"].strip() for r, t in zip(roles, turns)):
            report.add("empty_answer", where, "an answer is empty")
            continue
        markers = sum(t["value"].count(IMAGE_MARKER) for t in turns)
        if markers != len(images):
            report.add("image_count", where, f"{markers} {IMAGE_MARKER} marker(s) but {len(images)} image(s)")
            continue
        paths = [base / p for p in images]
        outside = next((p for p in paths if not allow_outside and not inside(p)), None)
        if outside is not None:
            report.add("outside_data_dir", where, outside_detail(outside, base))
            continue
        it = iter(str(p) for p in paths)
        yield where, obj, [Turn(r, _segments(t["value"], it), t.get("kind") if isinstance(t.get("kind"), str) else None)
                           for r, t in zip(roles, turns)]


def is_conversation_file(path: Path) -> bool:
    """Whether a .json / .jsonl file holds conversations: its first record has a 'conversations' list."""
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                first = json.loads(f.readline() or "null")
        elif path.suffix == ".json":
            with open(path, encoding="utf-8") as f:
                head = f.read(1 << 16)
            return head.lstrip().startswith("[") and '"conversations"' in head
        else:
            return False
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and isinstance(first.get("conversations"), list)
