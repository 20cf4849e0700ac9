"""``python -m earlyfusion.demo``: the whole pipeline through the real command line, at a tiny size."""

import json


def test_the_demo_runs_every_stage_and_ends_with_the_figures(tmp_path, capsys):
    """With conversations: the data holds them, the pictures are 48 px with one image code per cell of the scene
    grid, the decoder trains at the lower peak rate, the edit is drawn, and eval's last line scores them beside the
    captions and drawings."""
    from earlyfusion.demo import CHAT_LR, main

    out = tmp_path / "demo"
    assert main(["--out", str(out), "--num-images", "200", "--conversations", "80", "--tokenizer-steps", "10",
                 "--steps", "6", "--preset", "tiny", "--no-compile", "--eval-limit", "4"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("caption_exact_match", "t2i_exact_match", "vqa_exact_match", "multi_image_accuracy", "edit_accuracy"):
        assert key in figures
    assert figures["conversations"] == 4  # --eval-limit
    edits = [r for r in json.loads((out / "data" / "conversations_test.json").read_text())
             if r["conversations"][-1]["value"] == "<image>"]
    assert (out / "edit" / "sample-00.png").is_file() == bool(edits)
    assert len(list((out / "samples").glob("*.png"))) >= 4
    vq = json.loads((out / "image_tokenizer" / "config.json").read_text())
    assert (vq["image_size"], vq["grid"]) == (48, [3, 3])
    trained = json.loads(next((out / "lm" / "checkpoints").glob("step-*/config.json")).read_text())
    assert trained["train"]["lr"] == CHAT_LR
    assert trained["decoder"]["image_positions"] == 0  # only with --image-positions
