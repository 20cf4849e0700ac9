"""Conversations about the built-in scenes: questions about one picture, questions about two, and edits.

Each conversation is one record of LLaVA's JSON format (``{"id", "image" | "images", "conversations": [{"from":
"human" | "gpt", "value": ...}]}``, an ``<image>`` marker in a turn for each of its pictures, in order), with what
evaluation needs beside it: each answer's ``kind`` and the caption of every picture (``captions``, the scene as
``shapes.caption`` writes it, so that ``shapes.parse_caption`` gives it back).

* **one picture** (``QUESTION_KINDS``): two to five questions about it: a shape's colour, shape, size or
  position, how many shapes there are, and whether a given shape is there (yes / no). A shape is named by what
  sets it apart in its scene (its kind when the other is of another kind, else its colour);
* **two pictures** (``TWO_IMAGE_KINDS``): which one holds a given shape ("the first" / "the second"), and what
  changed from the first to the second (one edit: "the circle turned blue");
* **edits** (``EDIT_KINDS``): a picture and an instruction (recolour, move, resize, add or remove a shape), answered
  with the edited picture.

Held-out conversations show only two-shape scenes that no training conversation and no training pair shows, so
answering them is never recalling them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from earlyfusion.core.logs import progress
from earlyfusion.training.shapes import (
    COLOUR_NAMES,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeSpec,
    caption,
    png_bytes,
    random_scene,
    render_array,
)

QUESTION_KINDS = ("colour", "shape", "size", "position", "count", "yes_no")
TWO_IMAGE_KINDS = ("which", "changed")
EDIT_KINDS = ("recolour", "move", "resize", "add", "remove")
FAMILIES = ("question", "two_images", "edit")
FAMILY_SHARES = (0.5, 0.25, 0.25)  # of the conversations: one picture / two pictures / edits
IMAGE = "<image>"
NUMBERS = ("no", "one", "two")
QUESTIONS = (2, 5)
"""Questions asked about one picture (fewest, most): an answer takes a few tokens and the picture many, so several
questions about it make the most of what a step reads; the same attribute asked of both shapes teaches which shape a
name points at."""
WHICH_QUESTIONS = 2  # "which picture has ..." questions about the same two pictures, at most
TWO_SHAPES = 0.8
"""Share of two-shape scenes among the pictures a conversation starts from: a question or an edit about a lone shape
never asks which shape a name points at, the skill that held-out conversations (all two-shape) need most."""
MAX_DRAWS = 40  # question draws for one picture: a one-shape scene allows few distinct questions

Scene = frozenset[ShapeSpec]


def _name(spec: ShapeSpec, scene: Scene) -> str:
    """What sets ``spec`` apart in ``scene``: 'the circle', or 'the red circle' when both shapes are circles."""
    same_kind = [s for s in scene if s.shape == spec.shape]
    return f"the {spec.shape}" if len(same_kind) == 1 else f"the {spec.colour} {spec.shape}"


def _pick(rng: np.random.Generator, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


def question(rng: np.random.Generator, scene: Scene, kind: str) -> tuple[str, str]:
    """(question, answer) of ``kind`` about ``scene``."""
    spec = _pick(rng, sorted(scene))
    name = _name(spec, scene)
    if kind == "colour":
        return f"what colour is {name}?", spec.colour
    if kind == "shape":
        return f"what shape is {POSITION_PHRASES[spec.position]}?", spec.shape
    if kind == "size":
        return f"is {name} small or large?", spec.size
    if kind == "position":
        return f"where is {name}?", POSITION_PHRASES[spec.position]
    if kind == "count":
        return "how many shapes are there?", NUMBERS[len(scene)]
    if kind == "yes_no":
        if rng.random() < 0.5:
            shape, colour = spec.shape, spec.colour
        else:  # a shape of a kind or colour the scene does not hold together
            there = {(s.shape, s.colour) for s in scene}
            shape, colour = _pick(rng, [(h, c) for h in SHAPES for c in COLOUR_NAMES if (h, c) not in there])
        answer = "yes" if any((s.shape, s.colour) == (shape, colour) for s in scene) else "no"
        return f"is there a {colour} {shape}?", answer
    raise ValueError(f"unknown question kind {kind!r}")


def edit(rng: np.random.Generator, scene: Scene, kind: str) -> tuple[str, Scene, str] | None:
    """(instruction, the edited scene, what changed as said of the two pictures) of ``kind``, or None where the
    scene allows no such edit (adding to a full scene, removing its only shape)."""
    spec = _pick(rng, sorted(scene))
    name = _name(spec, scene)
    rest = scene - {spec}
    if kind == "recolour":
        colour = _pick(rng, [c for c in COLOUR_NAMES if c not in {s.colour for s in scene}])
        new = ShapeSpec(spec.shape, colour, spec.size, spec.position)
        return f"make {name} {colour}", rest | {new}, f"{name} turned {colour}"
    if kind == "move":
        where = _pick(rng, [p for p in POSITIONS if p not in {s.position for s in scene}])
        new = ShapeSpec(spec.shape, spec.colour, spec.size, where)
        return f"move {name} {POSITION_PHRASES[where]}", rest | {new}, f"{name} moved {POSITION_PHRASES[where]}"
    if kind == "resize":
        size = SIZES[1 - SIZES.index(spec.size)]
        new = ShapeSpec(spec.shape, spec.colour, size, spec.position)
        return f"make {name} {size}", rest | {new}, f"{name} became {size}"
    if kind == "add":
        if len(scene) > 1:
            return None
        new = ShapeSpec(_pick(rng, SHAPES), _pick(rng, [c for c in COLOUR_NAMES if c != spec.colour]),
                        _pick(rng, SIZES), _pick(rng, [p for p in POSITIONS if p != spec.position]))
        return f"add {new.phrase()}", scene | {new}, f"{new.phrase()} was added"
    if kind == "remove":
        if len(scene) < 2:
            return None
        return f"remove {name}", rest, f"{name} was removed"
    raise ValueError(f"unknown edit kind {kind!r}")


def scene_with(rng: np.random.Generator, shapes: int | None) -> Scene:
    """A random scene of ``shapes`` shapes (None: two with probability ``TWO_SHAPES``, else one)."""
    if shapes is None:
        shapes = 2 if rng.random() < TWO_SHAPES else 1
    while len(scene := random_scene(rng)) != shapes:
        pass
    return scene


class _Writer:
    """Renders pictures into ``folder`` (relative to the conversation file's folder) and builds the records."""

    def __init__(self, root: Path, folder: str, canvas: tuple[int, int]):
        self.root, self.folder, self.canvas = root, folder, canvas
        (root / folder).mkdir(parents=True)
        self.count = 0

    def picture(self, scene: Scene) -> str:
        name = f"{self.folder}/{self.count:06d}.png"
        self.count += 1
        (self.root / name).write_bytes(png_bytes(render_array(scene, self.canvas)))
        return name


def conversation(rng: np.random.Generator, family: str, scene_of) -> tuple[dict, list[Scene]] | None:
    """One record of ``family`` without its pictures' file names, and its scenes in the order of its ``<image>``
    markers; ``scene_of(rng, shapes)`` draws each first scene (``shapes``: the number the edit needs, None: any).
    None where the scenes drawn allow no question or edit of the kind drawn (the caller draws again)."""
    turns: list[dict] = []
    n_questions = QUESTIONS[0] + int(rng.integers(QUESTIONS[1] - QUESTIONS[0] + 1))
    if family == "question":
        scene = scene_of(rng, None)
        scenes = [scene]
        asked: set[str] = set()
        for _ in range(MAX_DRAWS):
            if len(asked) == n_questions:
                break
            kind = _pick(rng, QUESTION_KINDS)
            q, a = question(rng, scene, kind)
            if q not in asked:
                asked.add(q)
                turns += [{"from": "human", "value": f"{q}\n{IMAGE}" if len(asked) == 1 else q},
                          {"from": "gpt", "value": a, "kind": kind}]
    elif family == "two_images":
        kind = _pick(rng, TWO_IMAGE_KINDS)
        first = scene_of(rng, None)
        if kind == "changed":
            made = edit(rng, first, _pick(rng, EDIT_KINDS))
            if made is None:
                return None
            _, second, answer = made
            q = "what changed from the first picture to the second?"
        else:
            second = scene_of(rng, None)
            pairs = [{(s.shape, s.colour) for s in x} for x in (first, second)]
            options = [(p, "the first") for p in sorted(pairs[0] - pairs[1])] + \
                [(p, "the second") for p in sorted(pairs[1] - pairs[0])]
            if not options:
                return None
            for k in rng.permutation(len(options))[:WHICH_QUESTIONS]:
                (shape, colour), answer = options[k]
                q = f"which picture has a {colour} {shape}, the first or the second?"
                turns += [{"from": "human", "value": f"{q}\n{IMAGE}\n{IMAGE}" if not turns else q},
                          {"from": "gpt", "value": answer, "kind": kind}]
        scenes = [first, second]
        if kind == "changed":
            turns += [{"from": "human", "value": f"{q}\n{IMAGE}\n{IMAGE}"}, {"from": "gpt", "value": answer, "kind": kind}]
    elif family == "edit":
        kind = _pick(rng, EDIT_KINDS)
        scene = scene_of(rng, {"add": 1, "remove": 2}.get(kind))
        made = edit(rng, scene, kind)
        if made is None:
            return None
        instruction, target, _ = made
        scenes = [scene, target]
        turns += [{"from": "human", "value": f"{instruction}\n{IMAGE}"}, {"from": "gpt", "value": IMAGE, "kind": kind}]
    else:
        raise ValueError(f"unknown conversation family {family!r}")
    return {"conversations": turns, "captions": [caption(s) for s in scenes]}, scenes


def write_conversations(dest: Path, n_train: int, n_test: int, seed: int, canvas: tuple[int, int],
                        train_scenes: set[Scene], held_out_scenes: set[Scene] = frozenset()) -> dict[str, int]:
    """``dest/conversations.json`` (pictures in ``dest/chat``) and the held-out ``dest/conversations_test.json``
    (pictures in ``dest/chat_test``). Every two-shape scene of a held-out conversation is absent from
    ``train_scenes`` (the training pairs' scenes) and from every training conversation (one-shape scenes are too few
    to hold any out: an added shape's edit starts from one); no training conversation shows a two-shape scene of
    ``held_out_scenes`` (the held-out pairs' scenes that training pairs do not show), so that conversations do not
    teach what the held-out captions and drawings are scored on."""
    rng = np.random.default_rng([seed, 5])
    seen = set(train_scenes)

    def held_out(rng: np.random.Generator, shapes: int | None) -> Scene:
        if shapes == 1:
            return scene_with(rng, 1)  # an added shape's edit: the scene it makes is the new one
        while (scene := scene_with(rng, 2)) in seen:
            pass
        return scene

    counts = {}
    for name, folder, n, scene_of in (("conversations.json", "chat", n_train, scene_with),
                                      ("conversations_test.json", "chat_test", n_test, held_out)):
        writer = _Writer(dest, folder, canvas)
        records = []
        with progress(total=n, desc=f"writing {name}") as bar:
            while len(records) < n:
                made = conversation(rng, FAMILIES[int(rng.choice(len(FAMILIES), p=FAMILY_SHARES))], scene_of)
                if made is None:
                    continue
                record, scenes = made
                if scene_of is held_out and any(len(x) == 2 and x in seen for x in scenes):
                    continue  # an edit that led to a scene training shows
                if scene_of is scene_with and any(len(x) == 2 and x in held_out_scenes for x in scenes):
                    continue  # a held-out pair's scene
                if scene_of is scene_with:
                    seen.update(scenes)
                images = [writer.picture(x) for x in scenes]
                files = {"image": images[0]} if len(images) == 1 else {"images": images}
                records.append({"id": f"{folder}-{len(records):06d}", **files, **record})
                bar.update(1)
        (dest / name).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        counts[name] = len(records)
    return counts
