"""Built-in conversations (`data shapes --num-conversations`): LLaVA records whose pictures show their captions, whose
answers are right for their scenes, whose held-out scenes training never shows, byte-identical for a seed."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from earlyfusion.training.shapes import parse_caption, render_array
from earlyfusion.training.shapes_chat import (EDIT_KINDS, FAMILY_SHARES, IMAGE, NUMBERS, QUESTION_KINDS, QUESTIONS,
                                             TWO_IMAGE_KINDS, TWO_SHAPES, WHICH_QUESTIONS, edit, question, scene_with)
from earlyfusion.training.shapes_data import ShapesConfig, generate_cmd


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "shapes"
    generate_cmd(ShapesConfig(out=str(out), num_images=60, image_size=16, seed=1, num_interleaved=0, num_text=0,
                              num_conversations=200))
    return out


def _records(data, name):
    return json.loads((data / name).read_text())


def _images(record) -> list[str]:
    return [record["image"]] if "image" in record else record["images"]


def test_records_are_llava_conversations_whose_pictures_show_their_captions(data):
    train, test = _records(data, "conversations.json"), _records(data, "conversations_test.json")
    assert len(train) == 200 and len(test) == 20
    kinds = Counter()
    for record in train + test:
        turns, images = record["conversations"], _images(record)
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert sum(t["value"].count(IMAGE) for t in turns) == len(images) == len(record["captions"])
        assert all(t["value"].strip() for t in turns)
        for path, text in zip(images, record["captions"]):
            scene = parse_caption(text)
            assert scene is not None
            assert np.array_equal(np.asarray(Image.open(data / path).convert("RGB")), render_array(scene, 16))
        answered = [t["kind"] for t in turns if t["from"] == "gpt"]
        kinds.update(answered)
        asked = [t["value"].replace(IMAGE, "").strip() for t in turns if t["from"] == "human"]
        assert len(set(asked)) == len(asked)  # never the same question twice
        if answered[0] in QUESTION_KINDS:
            assert QUESTIONS[0] <= len(answered) <= QUESTIONS[1] and set(answered) <= set(QUESTION_KINDS)
        elif answered[0] == "which":
            assert 1 <= len(answered) <= WHICH_QUESTIONS and set(answered) == {"which"}
        else:
            assert len(answered) == 1
    assert set(kinds) == set(QUESTION_KINDS) | set(TWO_IMAGE_KINDS) | set(EDIT_KINDS)


def test_training_conversations_mostly_start_from_two_shapes(data):
    """Questions and edits about a lone shape never ask which shape a name points at: about TWO_SHAPES of the
    pictures a training conversation starts from hold two shapes (an edit that adds a shape always starts from one),
    and a few hold one, so that 'how many' still has two answers to tell apart."""
    firsts = [r["conversations"][-1]["kind"] != "add" and len(parse_caption(r["captions"][0]))
              for r in _records(data, "conversations.json")]
    firsts = [n for n in firsts if n]
    share = firsts.count(2) / len(firsts)
    assert abs(share - TWO_SHAPES) < 0.1 and firsts.count(1) > 0
    assert Counter(len(scene_with(np.random.default_rng(k), None)) for k in range(400))[2] / 400 == \
        pytest.approx(TWO_SHAPES, abs=0.06)


def test_families_come_in_their_shares(data):
    """One picture / two pictures / edits in FAMILY_SHARES, told apart by the kind of their last answer."""
    family = {**{k: 0 for k in QUESTION_KINDS}, **{k: 1 for k in TWO_IMAGE_KINDS}, **{k: 2 for k in EDIT_KINDS}}
    counts = Counter(family[r["conversations"][-1]["kind"]] for r in _records(data, "conversations.json"))
    shares = [counts[f] / sum(counts.values()) for f in range(3)]
    assert all(abs(s - want) < 0.08 for s, want in zip(shares, FAMILY_SHARES)), shares


def test_held_out_conversations_show_no_two_shape_scene_of_training(data):
    pairs = {parse_caption(json.loads(line)["text"])
             for line in (data / "train" / "metadata.jsonl").read_text().splitlines()}
    trained = pairs | {parse_caption(c) for r in _records(data, "conversations.json") for c in r["captions"]}
    held = [parse_caption(c) for r in _records(data, "conversations_test.json") for c in r["captions"]]
    assert held and not [s for s in held if len(s) == 2 and s in trained]


def test_training_conversations_avoid_the_held_out_pairs_scenes(tmp_path):
    """Scenes passed as held out (the test and val pairs' new scenes) appear in no training conversation: the same
    seed without them would show every one of them."""
    from earlyfusion.training.shapes_chat import write_conversations

    def two_shape_scenes(dest):
        return {s for r in _records(dest, "conversations.json") for c in r["captions"] if len(s := parse_caption(c)) == 2}

    write_conversations(tmp_path / "a", 60, 6, 3, (16, 16), set())
    before = two_shape_scenes(tmp_path / "a")
    write_conversations(tmp_path / "b", 60, 6, 3, (16, 16), set(), held_out_scenes=before)
    assert before and not two_shape_scenes(tmp_path / "b") & before


@pytest.mark.parametrize("seed", range(20))
def test_answers_are_right_for_their_scenes(seed):
    """Each question's answer read back from the scene; each edit changes exactly what its instruction says."""
    rng = np.random.default_rng(seed)
    scene = scene_with(rng, 2)
    q, a = question(rng, scene, "count")
    assert a == NUMBERS[2]
    q, a = question(rng, scene, "yes_no")
    colour, shape = q.removeprefix("is there a ").removesuffix("?").split()
    assert a == ("yes" if any((s.colour, s.shape) == (colour, shape) for s in scene) else "no")
    q, a = question(rng, scene, "colour")
    named = [s for s in scene if q.endswith(f"the {s.shape}?") or q.endswith(f"the {s.colour} {s.shape}?")]
    assert len(named) == 1 and named[0].colour == a
    for kind in EDIT_KINDS:
        made = edit(rng, scene, kind)
        if kind == "add":
            assert made is None  # a two-shape scene is full
            continue
        instruction, target, said = made
        changed = scene ^ target
        assert len(changed) == (1 if kind == "remove" else 2), (kind, instruction)
        if kind != "remove":
            before, after = sorted(changed & scene), sorted(changed & target)
            differ = [f for f in ("shape", "colour", "size", "position") if getattr(before[0], f) != getattr(after[0], f)]
            assert differ == [{"recolour": "colour", "move": "position", "resize": "size"}[kind]]
            assert len({s.position for s in target}) == len(target)  # never two shapes in one cell


def test_the_same_seed_writes_the_same_files(data, tmp_path):
    again = tmp_path / "again"
    generate_cmd(ShapesConfig(out=str(again), num_images=60, image_size=16, seed=1, num_interleaved=0, num_text=0,
                              num_conversations=200))
    for name in ("conversations.json", "conversations_test.json", "chat/000017.png", "chat_test/000003.png"):
        assert (again / name).read_bytes() == (data / name).read_bytes()
    plain = tmp_path / "plain"
    generate_cmd(ShapesConfig(out=str(plain), num_images=20, image_size=16, seed=1, num_interleaved=0, num_text=0))
    assert not (plain / "conversations.json").exists() and not (plain / "chat").exists()
