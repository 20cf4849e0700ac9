"""LLaVA conversations read by the records rules: good ones as turns of text and images, each bad one skipped and
counted by its reason; the built-in conversations read whole."""

from __future__ import annotations

import json

from earlyfusion.core.rundir import QUESTION_FIRST
from earlyfusion.training.data.conversations import ANSWER, ASK, IMAGE_MARKER, conversation_records, is_conversation_file
from earlyfusion.training.shapes_chat import EDIT_KINDS, QUESTION_KINDS, TWO_IMAGE_KINDS
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
    assert len(got) == 2 and dict(report.counts) == {
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


def _chat_data(tmp_path):
    from earlyfusion.cli import main
    from test_shards import make_vq

    generate_cmd(ShapesConfig(out=str(tmp_path / "s"), num_images=40, image_size=16, num_interleaved=0, num_text=0,
                              num_conversations=80))
    vq = make_vq(tmp_path / "vq")
    assert main(["vocab", "build", "--data", str(tmp_path / "s"), "--image-tokenizer", str(vq), "--out",
                 str(tmp_path / "vocab")]) == 0
    return tmp_path / "s", vq, tmp_path / "vocab"


def test_only_the_assistant_turns_are_trained(tmp_path):
    """Packed rows of conversations: a target has loss exactly where the token is part of an answer (its text,
    pictures and <eot>) or the closing </s>; questions, the pictures asked about and the markers never."""
    from earlyfusion.tokenizer.vocab import Vocabulary
    from earlyfusion.training.data import DataConfig, training_batches
    from earlyfusion.training.data.config import IGNORE

    data, vq, vocab_dir = _chat_data(tmp_path)
    vocab = Vocabulary.load(vocab_dir)
    assert vocab.chat
    user, assistant, eot = (vocab.chat_id(r) for r in ("user", "assistant", "eot"))
    batches = training_batches(DataConfig(sources=[str(data / "conversations.json")]), vocab=vocab,
                               image_tokenizer=vq, context_len=128, batch_size=4, seed=0)
    checked = 0
    for _ in range(3):
        b = next(batches)
        for r in range(4):
            tokens, targets, docs = b["tokens"][r].tolist(), b["targets"][r].tolist(), b["doc_ids"][r].tolist()
            answering = False
            for i in range(len(tokens) - 1):
                if docs[i] < 0 or docs[i + 1] != docs[i]:
                    answering = False
                    continue
                nxt = tokens[i + 1]
                if tokens[i] in (assistant, eot):  # an answer starts after its marker and ends with its <eot>
                    answering = tokens[i] == assistant
                want = answering or nxt == vocab.eos
                assert (targets[i] != IGNORE) == want, (r, i)
                assert targets[i] in (IGNORE, nxt)
                checked += targets[i] != IGNORE
    assert checked > 50 and user in b["tokens"]


def test_training_on_conversations_lowers_the_loss(tmp_path):
    from conftest import run_cli

    data, vq, vocab = _chat_data(tmp_path)
    run_cli("train", "--data", data / "conversations.json", "--image-tokenizer", vq, "--vocab", vocab, "--out",
            tmp_path / "run", "--preset", "tiny", "--steps", 40, "--batch-size", 8, "--context-len", 128,
            "--warmup-steps", 2, "--eval-every", 0, "--lr", 3e-3)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_conversations_need_a_vocabulary_with_the_markers(tmp_path, capsys):
    from conftest import assert_one_line_error, cli_status
    from earlyfusion.cli import main

    data, vq, _ = _chat_data(tmp_path)
    assert main(["vocab", "build", "--data", str(data / "train"), "--image-tokenizer", str(vq), "--out",
                 str(tmp_path / "plain")]) == 0
    rc, err = cli_status(capsys, ["train", "--data", data / "conversations.json", "--image-tokenizer", vq, "--vocab",
                                  tmp_path / "plain", "--out", tmp_path / "run", "--preset", "tiny", "--steps", 2])
    assert_one_line_error(rc, err)
    assert "conversation markers" in err


def test_a_chat_prompt_is_the_training_template_up_to_the_answer(tmp_path):
    """The prompt an answer is sampled from is token for token the training document's start, up to the answer."""
    import numpy as np

    from earlyfusion.sampling.chat import chat_prompt
    from earlyfusion.tokenizer.vocab import Vocabulary
    from earlyfusion.training.data.chat_template import conversation_document

    data, vq, vocab_dir = _chat_data(tmp_path)
    vocab = Vocabulary.load(vocab_dir)
    grid = np.arange(16).reshape(4, 4) % vocab.codebook_size
    turns = [(ASK, [("i", grid), ("t", "what colour is the circle?")]), (ANSWER, [("t", "red")]),
             (ASK, [("t", "and the square?")])]
    encoded = [(r, [("t", np.asarray(vocab.encode_text(x))) if k == "t" else (k, x) for k, x in p]) for r, p in turns]
    full, trained = conversation_document(vocab, encoded + [(ANSWER, [("t", np.asarray(vocab.encode_text("blue")))])])
    prompt = chat_prompt(vocab, turns)
    assert full[:len(prompt)].tolist() == prompt and prompt[-1] == vocab.chat_id("assistant")
    assert not trained[:len(prompt)][-3:].any() and trained[len(prompt):].all()


def test_held_out_conversations_are_scored(tmp_path):
    """`chat_eval` on a briefly trained tiny model: every held-out answer is asked for and scored by kind."""
    from conftest import run_cli
    from earlyfusion.chat_eval import conversation_figures, read_conversations
    from earlyfusion.training.data.runs import load_run

    data, vq, vocab = _chat_data(tmp_path)
    run_cli("train", "--data", data / "conversations.json", "--image-tokenizer", vq, "--vocab", vocab, "--out",
            tmp_path / "run", "--preset", "tiny", "--steps", 4, "--batch-size", 4, "--context-len", 128,
            "--warmup-steps", 1, "--eval-every", 0)
    run = load_run(tmp_path / "run")
    records, _ = read_conversations(data / "conversations_test.json")
    figures = conversation_figures(run.decoder.eval(), run.vocab, run.vq, records, out=tmp_path / "drawn")
    answers = sum(t["from"] == "gpt" for r in json.loads((data / "conversations_test.json").read_text())
                  for t in r["conversations"])
    assert figures["conversations"] == 8 and figures["answers"] == answers
    for key in ("answer_exact_match", "vqa_exact_match", "multi_image_accuracy", "edit_accuracy"):
        assert figures[key] is None or 0.0 <= figures[key] <= 1.0, key
    assert set(figures["answer_accuracy_by_kind"]) <= {*QUESTION_KINDS, *TWO_IMAGE_KINDS, *EDIT_KINDS}


def test_every_drawn_answer_is_written_to_a_file_of_its_own(tmp_path, monkeypatch):
    """A model that answers everything with a picture: as many PNGs as answers (none overwrites another)."""
    from types import SimpleNamespace

    from PIL import Image

    import earlyfusion.chat_eval as chat_eval
    from earlyfusion.training.data.runs import load_run
    from conftest import run_cli

    data, vq, vocab = _chat_data(tmp_path)
    run_cli("train", "--data", data / "conversations.json", "--image-tokenizer", vq, "--vocab", vocab, "--out",
            tmp_path / "run", "--preset", "tiny", "--steps", 1, "--batch-size", 2, "--context-len", 128,
            "--warmup-steps", 1, "--eval-every", 0)
    run = load_run(tmp_path / "run")

    def pictures(decoder, vocab, conversations, **kw):
        return [SimpleNamespace(images=[Image.new("RGB", (16, 16))], segments=[None]) for _ in conversations]

    monkeypatch.setattr(chat_eval, "answer", pictures)
    records, _ = chat_eval.read_conversations(data / "conversations.json")
    figures = chat_eval.conversation_figures(run.decoder, run.vocab, run.vq, records, out=tmp_path / "drawn")
    assert figures["answers"] > chat_eval.BATCH
    assert len(list((tmp_path / "drawn").glob("answer-*.png"))) == figures["answers"]


def test_sample_chat_is_a_session_in_the_terminal(tmp_path, capsys, monkeypatch):
    """`sample --chat`: questions from stdin, a missing picture is one line and the session goes on, answers print;
    with --image and --prompt the run answers one question; a run without conversation markers is one line."""
    import io

    from conftest import assert_one_line_error, cli_status, run_cli
    from earlyfusion.cli import main

    data, vq, vocab = _chat_data(tmp_path)
    run_cli("train", "--data", data / "conversations.json", "--image-tokenizer", vq, "--vocab", vocab, "--out",
            tmp_path / "run", "--preset", "tiny", "--steps", 2, "--batch-size", 4, "--context-len", 128,
            "--warmup-steps", 1, "--eval-every", 0)
    picture = next((data / "chat_test").glob("*.png"))
    script = f"/image {tmp_path / 'missing.png'}\n/image {picture}\nwhat colour is the circle?\nand the square?\n\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--chat", "--out", str(tmp_path / "chat"),
                 "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "cannot use" in out and "missing.png" in out and "picture 1 attached" in out
    assert out.count("model> ") == 2
    run_cli("sample", "--checkpoint", tmp_path / "run", "--image", picture, "--prompt", "make the circle blue",
            "--modality", "image", "--out", tmp_path / "edit")
    assert (tmp_path / "edit" / "sample-00.png").is_file()
    rc, err = cli_status(capsys, ["sample", "--checkpoint", tmp_path / "run", "--chat", "--prompt", "hi"])
    assert_one_line_error(rc, err)


def test_eval_scores_the_held_out_conversations_beside_the_test_split(tmp_path, capsys):
    from conftest import run_cli

    data, vq, vocab = _chat_data(tmp_path)
    run_cli("train", "--data", data, "--image-tokenizer", vq, "--vocab", vocab, "--out", tmp_path / "run", "--preset",
            "tiny", "--steps", 2, "--batch-size", 4, "--context-len", 128, "--warmup-steps", 1, "--eval-every", 0)
    capsys.readouterr()
    run_cli("eval", "--checkpoint", tmp_path / "run", "--data", data, "--json", "--limit", 3, "--out", tmp_path / "ev")
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["conversations"] == 3 and figures["answers"] >= 3
    for key in ("vqa_exact_match", "multi_image_accuracy", "edit_accuracy", "answer_exact_match"):
        assert key in figures


def test_eval_scores_a_file_of_conversations_alone(tmp_path, capsys):
    """--data a file of conversations: its answers scored (the kinds' figures where answers carry kinds), every drawn
    answer written out; a file with no readable conversation is one line."""
    from conftest import assert_one_line_error, cli_status, run_cli

    data, vq, vocab = _chat_data(tmp_path)
    assert cli_status(capsys, ["train", "--data", str(data), "--image-tokenizer", str(vq), "--vocab", str(vocab),
                               "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "2", "--batch-size", "4",
                               "--context-len", "128", "--warmup-steps", "1", "--eval-every", "0"])[0] == 0
    records = json.loads((data / "conversations.json").read_text())
    edits = [r for r in records if r["conversations"][-1]["value"] == "<image>"][:2]
    questions = [r for r in records if r["conversations"][-1]["value"] != "<image>"][:3]
    assert len(edits) == 2 and len(questions) == 3
    mine = data / "mine.jsonl"  # another file beside the pictures, one record per line, one broken
    mine.write_text("".join(json.dumps(r) + "\n" for r in edits + questions) + "{not json\n")
    capsys.readouterr()
    run_cli("eval", "--checkpoint", tmp_path / "run", "--data", mine, "--json", "--out", tmp_path / "ev")
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["conversations"] == 5 and figures["answers"] >= 5
    assert figures["edit_accuracy"] is not None and figures["answer_bleu4"] is not None
    assert "pairs" not in figures and "caption_exact_match" not in figures
    assert json.loads((tmp_path / "ev" / "figures.json").read_text())["answers"] == figures["answers"]
    run_cli("eval", "--checkpoint", tmp_path / "run", "--data", mine, "--limit", 2, "--out", tmp_path / "ev")  # again
    assert json.loads((tmp_path / "ev" / "figures.json").read_text())["conversations"] == 2
    broken = data / "broken.jsonl"
    broken.write_text('{"id": 1, "conversations": [{"from": "gpt", "value": "hi"}]}\n')
    rc, err = cli_status(capsys, ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(broken),
                                  "--out", str(tmp_path / "ev2")])
    assert_one_line_error(rc, err)


def test_a_question_puts_its_pictures_after_its_text_unless_told_otherwise():
    """A question is written in the order its run records (text first by default); --prompt-first /
    --no-prompt-first override it; outside conversations, pictures come first."""
    import torch

    from earlyfusion.sampling.cli import SampleConfig, _prompt_segments

    grid = torch.zeros(2, 2, dtype=torch.long)
    unset = SampleConfig(checkpoint="run", prompt="make the circle blue", image=["a.png"], modality="image", out="o")
    assert _prompt_segments(unset, [grid], question_first=True)[0] == "make the circle blue"
    assert _prompt_segments(unset, [grid], question_first=False)[0] is grid
    told = SampleConfig(checkpoint="run", prompt="make the circle blue", image=["a.png"], modality="image", out="o",
                        prompt_first=False)
    assert _prompt_segments(told, [grid], question_first=True)[0] is grid


def test_a_run_keeps_the_order_its_conversations_ask_in(tmp_path):
    """The built-in conversations put a question's text first, a LLaVA file often its pictures: the trained run
    records which, and a question to it is written that way; a run without conversations asks text first, and a
    fine-tune on data without conversations keeps its base run's order."""
    from conftest import run_cli
    from earlyfusion.training.data.runs import load_run, question_first

    data, vq, vocab = _chat_data(tmp_path)
    records = json.loads((data / "conversations.json").read_text())
    for r in records:
        for t in r["conversations"]:
            if t["from"] == "human" and IMAGE_MARKER in t["value"]:
                n = t["value"].count(IMAGE_MARKER)
                t["value"] = IMAGE_MARKER * n + "\n" + t["value"].replace(IMAGE_MARKER, "").strip()
    (data / "llava.json").write_text(json.dumps(records))
    expected = {"conversations.json": True, "llava.json": False, "train": True}
    for name, first in expected.items():
        run_cli("train", "--data", data / name, "--image-tokenizer", vq, "--vocab", vocab, "--out", tmp_path / name,
                "--preset", "tiny", "--steps", 1, "--batch-size", 2, "--context-len", 128, "--warmup-steps", 1,
                "--eval-every", 0)
        run = load_run(tmp_path / name)
        assert question_first(run) is first
        assert (QUESTION_FIRST in run.config) is (name != "train")
    run_cli("train", "--data", data / "train", "--init-from", tmp_path / "llava.json", "--out", tmp_path / "tuned",
            "--steps", 1, "--batch-size", 2, "--context-len", 128, "--warmup-steps", 1, "--eval-every", 0)
    assert question_first(load_run(tmp_path / "tuned")) is False


def test_an_exported_conversation_run_stops_at_the_end_of_a_turn(tmp_path, capsys):
    """export of a run whose vocabulary has the markers: transformers' generate() stops at </s> or <eot>."""
    from transformers import GenerationConfig

    from conftest import run_cli
    from earlyfusion.tokenizer.vocab import Vocabulary

    data, vq, vocab = _chat_data(tmp_path)
    run_cli("train", "--data", data / "conversations.json", "--image-tokenizer", vq, "--vocab", vocab, "--out",
            tmp_path / "run", "--preset", "tiny", "--steps", 1, "--batch-size", 2, "--context-len", 128,
            "--warmup-steps", 1, "--eval-every", 0)
    run_cli("export", "--checkpoint", tmp_path / "run", "--out", tmp_path / "hf")
    v = Vocabulary.load(vocab)
    assert GenerationConfig.from_pretrained(str(tmp_path / "hf")).eos_token_id == [v.eos, v.chat_id("eot")]
