"""`earlyfusion import chameleon` and `earlyfusion export`: a tiny Chameleon checkpoint written by transformers itself
(vocabulary in Chameleon's own order, image tokens by name), its logits after import, sampling and training from the
imported run, export -> import, and refused inputs."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
yaml = pytest.importorskip("yaml")

from earlyfusion.core.checkpoint import safetensors_specs  # noqa: E402
from earlyfusion.core.rundir import IMPORTED_DIR, PERMUTATION, resolve_checkpoint  # noqa: E402
from earlyfusion.training.data.runs import load_run  # noqa: E402
from earlyfusion.tokenizer.chameleon_vocab import image_code, image_code_name, read_chameleon_vocab  # noqa: E402
from earlyfusion.tokenizer.vocab import Vocabulary  # noqa: E402
from earlyfusion.tokenizer.vqgan import ChameleonVQGAN, VQGANConfig  # noqa: E402
from conftest import cli_status  # noqa: E402

# 16 px images, an 8x8 code grid, 64 codes
VQ = VQGANConfig(embed_dim=8, n_embed=64, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16, z_channels=8)
TEXTS = ["a red circle on a blue square", "the green triangle is small", "hello world, this is Chameleon speaking",
         "images and text in one sequence", "tokens: 123 456 789"] * 20
SAMPLE_TEXTS = ["a red circle", "hello world!", "Chameleon speaking 123", "unseen wörds and émojis 🙂", "  spaced  out\n"]
# a merge chain that builds an image token from text (their tokenizer reads "IMGIMGAZ" as image code 0; ours never)
IMG_MERGES = [("I", "M"), ("G", "A"), ("GA", "Z"), ("IM", "G"), ("IMG", "IM"), ("IMGIM", "GAZ")]


def _their_tokenizer(codebook: int, seed: int = 0, eot: bool = True) -> dict:
    """A byte-level BPE tokenizer.json in Chameleon's style: <s> <pad> </s> <unk> first, IMGIMG tokens in two runs in
    shuffled code order, <eoss> and <racm3:break> between them, a reserved token, text before, between and after."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}]+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=200, show_progress=False,
                                                        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = json.loads(tok.to_str())
    trained = [t for t, _ in sorted(d["model"]["vocab"].items(), key=lambda kv: kv[1])]
    text = trained[4:]
    text = list(dict.fromkeys(text + [b for _, b in IMG_MERGES] + [a + b for a, b in IMG_MERGES[:-1]]))
    rng = random.Random(seed)
    codes = list(range(codebook))
    rng.shuffle(codes)
    images = [image_code_name(c) for c in codes]
    k, h = len(text) // 3, codebook // 2
    order = (["<s>", "<pad>", "</s>", "<unk>"] + text[:k] + images[:h] + ["<eoss>", "<racm3:break>"] + text[k:2 * k]
             + ["<reserved08706>"] * eot + ["<reserved08707>"] + images[h:] + text[2 * k:])
    d["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    d["model"]["merges"] = [list(m) for m in d["model"]["merges"]] + [list(m) for m in IMG_MERGES]
    d["model"]["unk_token"] = "<unk>"
    special = ["<s>", "<pad>", "</s>", "<unk>", "<eoss>", "<racm3:break>"] + ["<reserved08706>"] * eot + ["<reserved08707>"]
    d["added_tokens"] = [{"id": order.index(t), "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t in special]
    d["post_processor"] = json.loads(processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", order.index("<s>"))]).__getstate__())
    return d


def _randomise(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("model.vqmodel."):
                p.add_((0.3 if "norm" in name else 0.05) * torch.randn_like(p))


def write_chameleon(dst: Path, *, dtype=torch.float32, shard: str | None = None, seed: int = 0, codebook: int = VQ.n_embed):
    """A tiny ChameleonForConditionalGeneration saved by transformers (config with vocabulary_map) + tokenizer.json;
    its VQGAN encoder is ``vqgan_state()``'s, as in a real release."""
    from tokenizers import Tokenizer
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    tok_json = _their_tokenizer(codebook, seed)
    vocab = Tokenizer.from_str(json.dumps(tok_json)).get_vocab(with_added_tokens=True)
    vq_config = dict(embed_dim=VQ.embed_dim, num_embeddings=VQ.n_embed, latent_channels=VQ.z_channels,
                     resolution=VQ.resolution, base_channels=VQ.ch, channel_multiplier=list(VQ.ch_mult),
                     num_res_blocks=VQ.num_res_blocks, attn_resolutions=[])
    config = ChameleonConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160,
                             vocabulary_map=vocab, vq_config=vq_config, bos_token_id=vocab["<s>"],
                             eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"])
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config).eval()
    _randomise(model)
    encoder_keys = set(model.model.vqmodel.state_dict())
    model.model.vqmodel.load_state_dict({k: v for k, v in vqgan_state().items() if k in encoder_keys})
    model.to(dtype).save_pretrained(str(dst), **({"max_shard_size": shard} if shard else {}))
    (dst / "tokenizer.json").write_text(json.dumps(tok_json))
    return model


def vqgan_state(cfg: VQGANConfig = VQ) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return ChameleonVQGAN(cfg).state_dict()


def write_vqgan(dst: Path, cfg: VQGANConfig = VQ) -> Path:
    """Meta's layout: vqgan.yaml + vqgan.ckpt = {"state_dict": taming keys}."""
    dst.mkdir(parents=True, exist_ok=True)
    state = vqgan_state(cfg)
    dd = {k: v for k, v in cfg.to_dict().items() if k not in ("embed_dim", "n_embed")}
    (dst / "vqgan.yaml").write_text(yaml.safe_dump(
        {"model": {"target": "taming.models.vqgan.VQModel",
                   "params": {"embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed, "ddconfig": dd, "lossconfig": {}}}}))
    torch.save({"state_dict": state}, dst / "vqgan.ckpt")
    return dst


def cli(capsys, *argv) -> tuple[int, str]:
    return cli_status(capsys, argv)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("chameleon")
    hf = write_chameleon(root / "model", shard="60KB")
    write_vqgan(root / "vqgan")
    from earlyfusion.convert import ImportChameleonConfig, import_chameleon

    import_chameleon(ImportChameleonConfig(model=str(root / "model"), vqgan=str(root / "vqgan"), out=str(root / "run")))
    return root, hf


def _their_ids(model_dir: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)


def _document(model_dir: Path) -> torch.Tensor:
    """Their ids of <s> text <racm3:break> 64 image codes <eoss> text: every kind of position."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    v = tok.get_vocab(with_added_tokens=True)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, VQ.n_embed, (64,), generator=g).tolist()
    text = tok.encode("a red circle on", add_special_tokens=False).ids
    ids = [v["<s>"], *text, v["<racm3:break>"], *(v[image_code_name(c)] for c in codes), v["<eoss>"], *text]
    return torch.tensor([ids])


def test_vocabulary_permutation_and_text_encoding(source):
    root, _ = source
    from tokenizers import Tokenizer

    theirs = Tokenizer.from_file(str(root / "model" / "tokenizer.json"))
    v = theirs.get_vocab(with_added_tokens=True)
    vocab = Vocabulary.load(root / "run" / "vocab")
    perm = json.loads((root / "run" / IMPORTED_DIR / PERMUTATION).read_text())["ours_to_theirs"]
    assert sorted(perm) == list(range(len(v))) == list(range(vocab.vocab_size))
    # the specials by role, the image codes by name, the text range in their order
    assert [perm[i] for i in (vocab.bos, vocab.eos, vocab.pad, vocab.boi, vocab.eoi)] == \
        [v[t] for t in ("<s>", "</s>", "<pad>", "<racm3:break>", "<eoss>")]
    assert vocab.codebook_size == VQ.n_embed and vocab.grid == (8, 8)
    for code in range(VQ.n_embed):
        assert perm[vocab.image_start + code] == v[image_code_name(code)]
    text = [perm[i] for i in vocab.text_range]
    assert text == sorted(text) and v["<reserved08707>"] in text and v["<unk>"] in text
    assert v[image_code_name(0)] > 4 and v[image_code_name(0)] != v[image_code_name(1)] - 1  # not in code order
    # text encodes exactly as their tokenizer does, up to the permutation
    for s in SAMPLE_TEXTS:
        assert [perm[i] for i in vocab.encode_text(s)] == theirs.encode(s, add_special_tokens=False).ids, s
        assert vocab.decode_text(vocab.encode_text(s)) == s
    # their merges read "IMGIMGAZ" as image code 0; ours keeps it text
    assert theirs.encode("IMGIMGAZ", add_special_tokens=False).ids == [v[image_code_name(0)]]
    assert all(i in vocab.text_range for i in vocab.encode_text("IMGIMGAZ"))
    assert image_code("IMGIMGBAZ") == 10 and image_code("hello") is None and image_code_name(10) == "IMGIMGBAZ"
    # the full tokenizer (special tokens matched) and its post processor carry our ids
    assert vocab.tokenizer.encode("a").ids[0] == vocab.bos and vocab.tokenizer.token_to_id("<eoss>") == vocab.eoi


@torch.no_grad()
def test_logits_match_transformers(source):
    root, hf = source
    run = load_run(root / "run")
    assert run.decoder.tok_emb.weight.dtype == torch.float32
    perm = torch.tensor(json.loads((root / "run" / IMPORTED_DIR / PERMUTATION).read_text())["ours_to_theirs"])
    theirs_to_ours = torch.argsort(perm)
    x = _document(root / "model")
    ours = run.decoder(theirs_to_ours[x])[..., theirs_to_ours]  # our logits, in their column order
    out = hf.model(input_ids=x).last_hidden_state
    raw = hf.lm_head(out)
    torch.testing.assert_close(ours, raw, rtol=1e-4, atol=1e-4)
    assert ours.std() > 0.1
    # transformers' forward masks the IMGIMG columns everywhere; every other column is the same logit
    masked = hf(input_ids=x).logits
    image_cols = perm[run.vocab.image_start:]
    assert (masked[..., image_cols] == torch.finfo(masked.dtype).min).all()
    keep = torch.ones(perm.numel(), dtype=torch.bool)
    keep[image_cols] = False
    torch.testing.assert_close(ours[..., keep], masked[..., keep], rtol=1e-4, atol=1e-4)


def test_sample_image_and_text_and_train(source, tmp_path, capsys):
    from earlyfusion.sampling.generate import SamplingConfig, generate

    root, _ = source
    rc, err = cli(capsys, "sample", "--checkpoint", root / "run", "--modality", "image", "--prompt", "a red circle",
                  "--out", tmp_path / "img", "--seed", 1)
    assert rc == 0, err
    assert (tmp_path / "img" / "sample-00.png").is_file() and (tmp_path / "img" / "grid.png").is_file()
    run = load_run(root / "run")
    [s] = generate(run.decoder, run.vocab, ["a red circle"], SamplingConfig(modality="image", seed=2), vq=run.vq)
    grids = [g for g in s.segments if isinstance(g, torch.Tensor)]
    assert s.stop == "image" and len(grids) == 1 and grids[0].shape == (8, 8) and len(s.images) == 1
    assert sum(run.vocab.is_image_id(t) for t in s.ids) == 64 and s.images[0].size == (16, 16)
    rc, err = cli(capsys, "sample", "--checkpoint", root / "run", "--prompt", "hello", "--max-new-tokens", 6)
    assert rc == 0, err
    [t] = generate(run.decoder, run.vocab, ["hello"], SamplingConfig(max_new_tokens=6))
    assert len(t.ids) >= 1 and not any(run.vocab.is_image_id(i) for i in t.ids)
    if _has_init_from():  # another change adds train --init-from
        rc, err = cli(capsys, "data", "shapes", "--out", tmp_path / "data", "--num-images", 24, "--image-size", 16,
                      "--num-interleaved", 4, "--num-text", 4)
        assert rc == 0, err
        rc, err = cli(capsys, "train", "--data", tmp_path / "data", "--init-from", root / "run", "--out", tmp_path / "ft",
                      "--steps", 2, "--batch-size", 2, "--warmup-steps", 1, "--eval-every", 0, "--checkpoint-every", 2)
        assert rc == 0, err
        assert load_run(tmp_path / "ft").decoder.config == run.decoder.config


def test_an_imported_run_converses_with_chameleons_template(source, tmp_path, capsys, monkeypatch):
    """Chameleon's end of turn becomes the vocabulary's eot: a conversation is their ids of
    <s> question <reserved08706> answer <reserved08706> </s> (no role markers), trained on the answer, its end of turn
    and </s>; a question is asked up to its end of turn, and sample --chat answers."""
    import io

    import numpy as np
    from tokenizers import Tokenizer

    from earlyfusion.sampling.chat import answer, chat_prompt
    from earlyfusion.training.data.chat_template import conversation_document
    from earlyfusion.training.data.conversations import ANSWER, ASK

    root, _ = source
    theirs = Tokenizer.from_file(str(root / "model" / "tokenizer.json"))
    v = theirs.get_vocab(with_added_tokens=True)
    perm = json.loads((root / "run" / IMPORTED_DIR / PERMUTATION).read_text())["ours_to_theirs"]
    run = load_run(root / "run")
    vocab = run.vocab
    assert vocab.chat and perm[vocab.chat_id("eot")] == v["<reserved08706>"]
    assert vocab.chat_id("user") is None and vocab.chat_id("assistant") is None
    grid = np.arange(64).reshape(8, 8) % VQ.n_embed
    q, a = (np.asarray(vocab.encode_text(t), np.int32) for t in ("what colour is it?", "red"))
    ids, trained = conversation_document(vocab, [(ASK, [("i", grid), ("t", q)]), (ANSWER, [("t", a)])])
    enc = [theirs.encode(t, add_special_tokens=False).ids for t in ("what colour is it?", "red")]
    image = [v["<racm3:break>"], *(v[image_code_name(int(c))] for c in grid.ravel()), v["<eoss>"]]
    eot = v["<reserved08706>"]
    assert [perm[i] for i in ids] == [v["<s>"], *image, *enc[0], eot, *enc[1], eot, v["</s>"]]
    assert trained.tolist() == [False] * (len(ids) - len(enc[1]) - 2) + [True] * (len(enc[1]) + 2)
    prompt = chat_prompt(vocab, [(ASK, [("i", grid), ("t", "what colour is it?")])])
    assert [perm[i] for i in prompt] == [v["<s>"], *image, *enc[0], eot]
    [s] = answer(run.decoder, vocab, [[(ASK, [("t", "hello")])]], max_new_tokens=4)
    assert 1 <= len(s.ids) <= 4 and vocab.chat_id("eot") not in s.ids[:-1]  # it stops at their end of turn
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n"))
    rc, err = cli(capsys, "sample", "--checkpoint", root / "run", "--chat", "--max-new-tokens", 4, "--out", tmp_path)
    assert rc == 0, err


def _has_init_from() -> bool:
    import dataclasses

    from earlyfusion.training.lm_config import TrainConfig

    return any(f.name == "init_from" for f in dataclasses.fields(TrainConfig))


@torch.no_grad()
def test_bf16_kept_and_sampled(tmp_path, capsys):
    write_chameleon(tmp_path / "model", dtype=torch.bfloat16, seed=5)
    write_vqgan(tmp_path / "vqgan")
    rc, err = cli(capsys, "import", "chameleon", "--model", tmp_path / "model", "--vqgan", tmp_path / "vqgan",
                  "--out", tmp_path / "run")
    assert rc == 0, err
    _, ckpt = resolve_checkpoint(tmp_path / "run")
    assert {dtype for dtype, _ in safetensors_specs(ckpt / "model.safetensors").values()} == {torch.bfloat16}
    run = load_run(tmp_path / "run")
    assert all(p.dtype == torch.bfloat16 for p in run.decoder.parameters())
    assert run.decoder(torch.tensor([[0, 5, 6]])).dtype == torch.float32
    rc, err = cli(capsys, "sample", "--checkpoint", tmp_path / "run", "--modality", "image", "--out", tmp_path / "img",
                  "--prompt", "a circle")
    assert rc == 0, err
    assert (tmp_path / "img" / "sample-00.png").is_file()


@torch.no_grad()
def test_export_then_import_gives_the_same_logits(source, tmp_path, capsys):
    from transformers import ChameleonForConditionalGeneration

    root, hf = source
    rc, err = cli(capsys, "export", "--checkpoint", root / "run", "--out", tmp_path / "hf")
    assert rc == 0, err
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == (root / "model" / "tokenizer.json").read_text()
    back = ChameleonForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    x = _document(root / "model")
    torch.testing.assert_close(back(input_ids=x).logits, hf(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    sd, ref = back.state_dict(), hf.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)  # the VQGAN encoder too
    assert back.config.vocabulary_map == hf.config.vocabulary_map
    rc, err = cli(capsys, "import", "chameleon", "--model", tmp_path / "hf", "--vqgan", root / "vqgan", "--out", tmp_path / "run2")
    assert rc == 0, err
    a, b = load_run(root / "run"), load_run(tmp_path / "run2")
    ids = torch.randint(0, a.vocab.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.decoder(ids), b.decoder(ids))
    rc, err = cli(capsys, "export", "--checkpoint", tmp_path / "run2", "--out", tmp_path / "hf")
    assert rc == 2 and "not an empty directory" in err


@torch.no_grad()
def test_export_of_a_run_trained_here(tiny_pipeline, tmp_path, capsys):
    """Our own ids and tokenizer.json; our VQ-VAE is not Chameleon's, so a placeholder VQGAN stands in for it."""
    from tokenizers import Tokenizer
    from transformers import ChameleonForConditionalGeneration

    rc, err = cli(capsys, "export", "--checkpoint", tiny_pipeline.lm, "--out", tmp_path / "hf")
    assert rc == 0, err
    run = load_run(tiny_pipeline.lm)
    hf = ChameleonForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, run.vocab.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hf(input_ids=ids).logits, run.decoder(ids), rtol=1e-4, atol=1e-4)
    assert hf.config.bos_token_id == run.vocab.bos and hf.config.vocabulary_map["<boi>"] == run.vocab.boi
    assert Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).to_str() == run.vocab.tokenizer.to_str()


def _assert_refused(capsys, out: Path, *argv, words: tuple[str, ...]):
    rc, err = cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("earlyfusion: error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_bad_inputs(source, tmp_path, capsys):
    root, _ = source
    model, vqgan, out = root / "model", root / "vqgan", tmp_path / "out"
    # not a Chameleon checkpoint
    (tmp_path / "empty").mkdir()
    _assert_refused(capsys, out, "import", "chameleon", "--model", tmp_path / "empty", "--vqgan", vqgan, "--out", out,
                    words=("config.json",))
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _assert_refused(capsys, out, "import", "chameleon", "--model", other, "--vqgan", vqgan, "--out", out,
                    words=("'llama'",))
    # a tokenizer.json without IMGIMG tokens
    no_img = tmp_path / "no_img"
    shutil.copytree(model, no_img)
    d = json.loads((no_img / "tokenizer.json").read_text())
    d["model"]["vocab"] = {t.replace("IMGIMG", "IMXIMG"): i for t, i in d["model"]["vocab"].items()}
    d["model"]["merges"] = d["model"]["merges"][:-1]
    (no_img / "tokenizer.json").write_text(json.dumps(d))
    _assert_refused(capsys, out, "import", "chameleon", "--model", no_img, "--vqgan", vqgan, "--out", out,
                    words=("no IMGIMG",))
    # an image code spelled twice
    dup = tmp_path / "dup"
    shutil.copytree(model, dup)
    d = json.loads((dup / "tokenizer.json").read_text())
    vocab = d["model"]["vocab"]
    vocab["IMGIMGABZ"] = vocab.pop(image_code_name(2))  # "AB" is code 1 again, code 2 is gone
    (dup / "tokenizer.json").write_text(json.dumps(d))
    _assert_refused(capsys, out, "import", "chameleon", "--model", dup, "--vqgan", vqgan, "--out", out,
                    words=("image code 1",))
    # a VQGAN whose codebook disagrees with the IMGIMG tokens
    small = write_vqgan(tmp_path / "vq32", VQGANConfig(**{**VQ.to_dict(), "n_embed": 32}))
    _assert_refused(capsys, out, "import", "chameleon", "--model", model, "--vqgan", small, "--out", out,
                    words=("32 codes", "64 IMGIMG"))
    # a truncated shard
    cut = tmp_path / "cut"
    shutil.copytree(model, cut)
    shard = sorted(cut.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _assert_refused(capsys, out, "import", "chameleon", "--model", cut, "--vqgan", vqgan, "--out", out,
                    words=(shard.name, "truncated"))
    # --out that is not empty
    out.mkdir()
    (out / "x").write_text("keep")
    rc, err = cli(capsys, "import", "chameleon", "--model", model, "--vqgan", vqgan, "--out", out)
    assert rc == 2 and "not an empty directory" in err and (out / "x").read_text() == "keep"


def test_vocab_errors_name_the_problem(tmp_path):
    from earlyfusion.core.errors import UserError

    with pytest.raises(UserError, match="tokenizer.json: not found"):
        read_chameleon_vocab(tmp_path)
    d = _their_tokenizer(16)
    d["model"]["vocab"]["IMGIMG7Z"] = d["model"]["vocab"].pop(image_code_name(3))
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="IMGIMG7Z"):
        read_chameleon_vocab(tmp_path)
    d = _their_tokenizer(16)
    d["model"]["vocab"]["hole"] = d["model"]["vocab"].pop(image_code_name(3))
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="image code 3 has none"):
        read_chameleon_vocab(tmp_path)
    # without their end-of-turn token: the five specials, no conversations, and a one-line reason where one is asked
    (tmp_path / "tokenizer.json").write_text(json.dumps(_their_tokenizer(16, eot=False)))
    vocab = read_chameleon_vocab(tmp_path).vocabulary((4, 4), "f" * 12)
    assert not vocab.chat and len(vocab.special_ids) == 5
    with pytest.raises(UserError, match="import the checkpoint again"):
        vocab.chat_id("eot")
    (tmp_path / "tokenizer.json").write_text(json.dumps(_their_tokenizer(16)))
    assert read_chameleon_vocab(tmp_path).vocabulary((4, 4), "f" * 12).chat


def test_imported_run_samples_with_chameleons_defaults_unless_told_otherwise(source, tmp_path, capsys, monkeypatch,
                                                                             tiny_pipeline):
    """`sample` on an imported run uses Chameleon's published settings for every option the user leaves out; options
    given on the command line win; our own runs keep our defaults. Interleaved (auto) sampling runs too."""
    import earlyfusion.sampling.cli as sc
    from earlyfusion.sampling.generate import SamplingConfig

    root, _ = source
    seen: list[SamplingConfig] = []
    real = sc.generate

    def spy(decoder, vocab, prompts, config, **kw):
        seen.append(config)
        return real(decoder, vocab, prompts, config, **kw)

    monkeypatch.setattr(sc, "generate", spy)
    rc, err = cli(capsys, "sample", "--checkpoint", root / "run", "--modality", "image", "--prompt", "a", "--out",
                  tmp_path / "a")
    assert rc == 0, err
    c = seen[-1]
    assert (c.temperature, c.top_k, c.top_p, c.image_temperature, c.image_top_k, c.image_top_p, c.guidance) == \
        (0.7, 0, 0.9, 0.7, 0, 0.9, 3.0)
    rc, err = cli(capsys, "sample", "--checkpoint", root / "run", "--modality", "image", "--prompt", "a", "--out",
                  tmp_path / "b", "--image-temperature", "0.2", "--cfg", "2", "--image-top-p", "1")
    assert rc == 0, err
    c = seen[-1]
    assert (c.image_temperature, c.guidance, c.image_top_p, c.temperature) == (0.2, 2.0, 1.0, 0.7)
    rc, err = cli(capsys, "sample", "--checkpoint", root / "run", "--prompt", "hi", "--max-new-tokens", 4)
    assert rc == 0, err and seen[-1].guidance == 1.0  # text: no guidance, even though the run has a default scale
    rc, err = cli(capsys, "sample", "--checkpoint", root / "run", "--modality", "auto", "--prompt", "hi",
                  "--max-new-tokens", 80, "--out", tmp_path / "auto")
    assert rc == 0, err and seen[-1].modality == "auto"
    rc, err = cli(capsys, "sample", "--checkpoint", tiny_pipeline.lm, "--prompt", "a", "--max-new-tokens", 4)
    assert rc == 0, err
    own = SamplingConfig()
    assert (seen[-1].temperature, seen[-1].top_k, seen[-1].top_p) == (own.temperature, own.top_k, own.top_p)
