"""LLaVA conversations read by the records rules: good ones as turns of text and images, each bad one skipped and
counted by its reason; the built-in conversations read whole."""

from __future__ import annotations

import json

from earlyfusion.training.data.conversations import ANSWER, ASK, conversation_records, is_conversation_file
from earlyfusion.training.data.records import SkipReport
from earlyfusion.training.shapes_data import ShapesConfig, generate_cmd


def test_good_and_bad_conversations(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    good = {"id": "1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "and the square?"}, {"from": "gpt", "value": "blue"}]}
    two = {"images": ["a.png", "b.png"], "conversations": [
        {"from": "user", "value": "<image> make it blue"}, {"from": "assistant", "value": "here: <image>"}]}
    records = [
        good, two,
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image><image> which?"},
                                             {"from": "gpt", "value": "the first"}]},  # more markers than images
        {"images": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image> what?"},
                                                         {"from": "gpt", "value": "x"}]},  # fewer
        {"image": "../outside.png", "conversations": [{"from": "human", "value": "<image>"},
                                                      {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]},
        {"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "hi"}]},
        {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
        ["not", "an", "object"],
    ]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(records))
    assert is_conversation_file(path)
    report = SkipReport()
    got = list(conversation_records(path, report))
    assert report.good == 2 and dict(report.counts) == {
        "image_count": 2, "outside_data_dir": 1, "empty_answer": 1, "turn_order": 2, "bad_record": 2}
    (_, _, turns), (_, _, edit) = got
    assert [t.role for t in turns] == [ASK, ANSWER, ASK, ANSWER]
    assert turns[0].segments == (("i", str(tmp_path / "a.png")), ("t", "what colour is the circle?"))
    assert edit[1].segments == (("t", "here:"), ("i", str(tmp_path / "b.png")))
    lines = tmp_path / "chat.jsonl"
    lines.write_text(json.dumps(good) + "\n{broken\n")
    report = SkipReport()
    assert len(list(conversation_records(lines, report))) == 1 and dict(report.counts) == {"bad_json": 1}
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    report = SkipReport()
    assert list(conversation_records(broken, report)) == [] and dict(report.counts) == {"bad_json": 1}


def test_the_built_in_conversations_read_whole(tmp_path):
    generate_cmd(ShapesConfig(out=str(tmp_path / "s"), num_images=20, image_size=16, num_interleaved=0, num_text=0,
                              num_conversations=60))
    for name, n in (("conversations.json", 60), ("conversations_test.json", 6)):
        report = SkipReport()
        got = list(conversation_records(tmp_path / "s" / name, report))
        assert len(got) == n and report.total == 0
        for _, record, turns in got:
            assert all(t.kind for t in turns if t.role == ANSWER)
            assert all((tmp_path / "s" / x).is_file() for k, x in (s for t in turns for s in t.segments) if k == "i")
