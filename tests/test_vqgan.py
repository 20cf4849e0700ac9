"""Chameleon's VQGAN: conversion from Meta's files, parity with transformers' encoder, and use as our image tokenizer."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from earlyfusion.core.errors import CheckpointError, UserError
from earlyfusion.tokenizer.vqgan import FORMAT, ChameleonVQGAN, VQGANConfig
from earlyfusion.tokenizer.vqgan_import import convert_vqgan
from earlyfusion.tokenizer.vq_checkpoint import load_vqvae, read_vq_config, save_vqvae, vq_fingerprint

# 32 px, two levels (16 px features at the second): attention at 16 covers the attention blocks of both halves
TINY = VQGANConfig(embed_dim=8, n_embed=64, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                   resolution=32, z_channels=8)


def _pixels(n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1


def _meta_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with a codebook drawn from the encoder's outputs (so that images use many codes)."""
    torch.manual_seed(seed)
    m = ChameleonVQGAN(TINY).eval()
    with torch.no_grad():
        z = m.quant_conv(m.encoder(_pixels(4, seed=7))).permute(0, 2, 3, 1).reshape(-1, TINY.embed_dim)
        m.quantize.embedding.weight.copy_(z[torch.randperm(len(z))[:TINY.n_embed]])
    return m.state_dict()


def _yaml(cfg: VQGANConfig = TINY, **dd_extra) -> dict:
    dd = {k: v for k, v in cfg.to_dict().items() if k not in ("embed_dim", "n_embed")}
    return {"model": {"base_learning_rate": 4.5e-06, "target": "taming.models.vqgan.VQModel",
                      "params": {"embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed, "ckpt_path": "/x/vqgan.ckpt",
                                 "ddconfig": {**dd, **dd_extra},
                                 "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}}


def _write_meta(src: Path, state=None, config=None) -> Path:
    """Meta's layout: vqgan.yaml + vqgan.ckpt = torch.save({"state_dict": sd}) with the loss's keys in it."""
    src.mkdir(parents=True, exist_ok=True)
    (src / "vqgan.yaml").write_text(yaml.safe_dump(config or _yaml()))
    sd = dict(_meta_state() if state is None else state)
    sd["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    torch.save({"state_dict": sd}, src / "vqgan.ckpt")
    return src


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vqgan")
    convert_vqgan(_write_meta(root / "meta"), root / "vq")
    return root / "vq"


def test_keys_are_taming_and_transformers_names():
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    with torch.device("meta"):  # the released shape: 512 px, 5 levels, 2 blocks, 8192 x 256 codebook
        ours = ChameleonVQGAN(VQGANConfig()).state_dict()
        hf = ChameleonVQVAE(ChameleonVQVAEConfig()).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items() if not k.startswith("decoder.")} == \
        {k: tuple(v.shape) for k, v in hf.items()}
    assert VQGANConfig().grid_size == (32, 32) and VQGANConfig().codebook_size == 8192
    for key in ("decoder.up.0.block.2.conv2.weight", "decoder.up.4.upsample.conv.weight", "decoder.up.1.block.0.nin_shortcut.weight",
                "decoder.mid.attn_1.proj_out.weight", "encoder.down.3.downsample.conv.weight", "encoder.down.4.block.0.nin_shortcut.bias"):
        assert key in ours
    assert "decoder.up.0.upsample.conv.weight" not in ours and "encoder.down.4.downsample.conv.weight" not in ours
    tiny = ChameleonVQGAN(TINY).state_dict()
    assert "encoder.down.1.attn.0.q.weight" in tiny and "decoder.up.1.attn.1.k.weight" in tiny
    assert not any(k.startswith(("encoder.down.0.attn", "decoder.up.0.attn")) for k in tiny)


def test_codes_match_transformers(converted):
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    ours = load_vqvae(converted)
    assert isinstance(ours, ChameleonVQGAN) and not ours.training
    hf = ChameleonVQVAE(ChameleonVQVAEConfig(
        embed_dim=TINY.embed_dim, num_embeddings=TINY.n_embed, double_latent=False, latent_channels=TINY.z_channels,
        resolution=32, in_channels=3, base_channels=TINY.ch, channel_multiplier=list(TINY.ch_mult),
        num_res_blocks=TINY.num_res_blocks, attn_resolutions=list(TINY.attn_resolutions), dropout=0.0)).eval()
    hf_keys = set(hf.state_dict())
    hf.load_state_dict({k: v for k, v in ours.state_dict().items() if k in hf_keys}, strict=True)
    x = _pixels(3)
    codes = ours.encode(x)
    with torch.no_grad():
        ref = hf.encode(x).image_tokens.reshape(codes.shape)
    assert torch.equal(codes, ref)
    assert codes.shape == (3, 16, 16) and codes.dtype == torch.long
    assert len(codes.unique()) > 8  # a meaningful comparison: many codes in use


def test_decode_range_and_round_trip(converted, tmp_path):
    vq = load_vqvae(converted)
    x = _pixels(2)
    codes = vq.encode(x)
    y = vq.decode(codes)
    assert y.shape == (2, 3, 32, 32) and float(y.min()) >= -1 and float(y.max()) <= 1
    assert torch.equal(vq.decode(codes.to(torch.int32)), y)
    save_vqvae(vq, tmp_path / "again")
    again = load_vqvae(tmp_path / "again")
    a, b = vq.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert torch.equal(again.encode(x), codes) and torch.equal(again.decode(codes), y)
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads((converted / "config.json").read_text())
    assert vq_fingerprint(tmp_path / "again") == vq_fingerprint(converted)
    with pytest.raises(ValueError, match="shape"):
        vq.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="codes must be in"):
        vq.decode(torch.full((1, 16, 16), TINY.n_embed))
    with pytest.raises(NotImplementedError, match="tokenizer train"):
        vq(x)


def test_directory_config_and_fingerprint(converted, tmp_path):
    raw = json.loads((converted / "config.json").read_text())
    assert raw["format"] == FORMAT == "earlyfusion.chameleon_vqgan" and raw["grid"] == [16, 16]
    assert {p.name for p in converted.iterdir()} == {"config.json", "model.safetensors", "MANIFEST.json"}
    assert not any(k.startswith("loss.") for k in load_file(converted / "model.safetensors"))
    cfg = read_vq_config(converted)
    assert cfg == TINY
    assert (cfg.image_size, cfg.downsample, cfg.grid_size, cfg.tokens_per_image, cfg.codebook_size) == (32, 2, (16, 16), 256, 64)
    fp = vq_fingerprint(converted)
    assert len(fp) == 64 and fp == vq_fingerprint(converted)
    # other weights, other fingerprint
    other = tmp_path / "other"
    convert_vqgan(_write_meta(tmp_path / "meta2", state=_meta_state(seed=3)), other)
    assert vq_fingerprint(other) != fp
    # an unknown format is refused by name
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**raw, "format": "something.else"}))
    with pytest.raises(CheckpointError, match="something.else"):
        read_vq_config(bad)


def test_data_pipeline_encodes_with_it(converted, tmp_path):
    from PIL import Image

    from earlyfusion.tokenizer.preprocess import preprocess
    from earlyfusion.training.data.codes import local_image_table

    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 40), (60 * i, 200 - 50 * i, 30)).save(p)
        paths.append(str(p))
    table = local_image_table(paths, paths, converted, vq_fingerprint(converted), tmp_path / "cache", strict=True)
    assert table.codes.shape == (3, 256) and table.reasons == ["", "", ""]
    direct = load_vqvae(converted).encode(torch.stack([preprocess(p, 32) for p in paths]))
    assert table.codes.tolist() == direct.reshape(3, -1).tolist()


def test_dtype_kept_and_safetensors_accepted(tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in _meta_state().items()}
    src = tmp_path / "meta"
    src.mkdir()
    (src / "vqgan.yaml").write_text(yaml.safe_dump(_yaml()))
    save_file(state, str(src / "vqgan.safetensors"))
    convert_vqgan(src, tmp_path / "vq")
    on_disk = load_file(tmp_path / "vq" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, state[k]) for k, v in on_disk.items())
    assert on_disk.keys() == state.keys()
    vq = load_vqvae(tmp_path / "vq")
    assert vq.decode(vq.encode(_pixels(1))).shape == (1, 3, 32, 32)


def _one_line_user_error(fn, match: str):
    with pytest.raises(UserError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return e.value


def test_bad_inputs(tmp_path):
    good = _write_meta(tmp_path / "good")
    out = tmp_path / "out"
    _one_line_user_error(lambda: convert_vqgan(tmp_path / "nowhere", out), "directory not found")
    no_yaml = tmp_path / "no_yaml"
    no_yaml.mkdir()
    (no_yaml / "vqgan.ckpt").write_bytes((good / "vqgan.ckpt").read_bytes())
    _one_line_user_error(lambda: convert_vqgan(no_yaml, out), "vqgan.yaml: file not found")
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "vqgan.yaml").write_text((good / "vqgan.yaml").read_text())
    _one_line_user_error(lambda: convert_vqgan(no_ckpt, out), "neither vqgan.ckpt nor vqgan.safetensors")
    (no_ckpt / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"params": {"embed_dim": 8, "n_embed": 64}}}))
    _one_line_user_error(lambda: convert_vqgan(no_ckpt, out), "no model.params.ddconfig")
    (no_ckpt / "vqgan.yaml").write_text("model: [unclosed")
    _one_line_user_error(lambda: convert_vqgan(no_ckpt, out), "not valid YAML")
    cfg = _yaml()
    del cfg["model"]["params"]["ddconfig"]["z_channels"]
    (no_ckpt / "vqgan.yaml").write_text(yaml.safe_dump(cfg))
    _one_line_user_error(lambda: convert_vqgan(no_ckpt, out), "lacks z_channels")
    (no_ckpt / "vqgan.yaml").write_text(yaml.safe_dump(_yaml(tanh_out=True)))
    _one_line_user_error(lambda: convert_vqgan(no_ckpt, out), "tanh_out")
    (no_ckpt / "vqgan.yaml").write_text(yaml.safe_dump(_yaml(ch=48)))
    _one_line_user_error(lambda: convert_vqgan(no_ckpt, out), "multiple of 32")
    # a truncated checkpoint
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "vqgan.yaml").write_text((good / "vqgan.yaml").read_text())
    data = (good / "vqgan.ckpt").read_bytes()
    (truncated / "vqgan.ckpt").write_bytes(data[: len(data) // 2])
    _one_line_user_error(lambda: convert_vqgan(truncated, out), "truncated or corrupted")
    for junk in (b"", b"not a checkpoint at all"):
        (truncated / "vqgan.ckpt").write_bytes(junk)
        _one_line_user_error(lambda: convert_vqgan(truncated, out), "truncated or corrupted")
    # weights of another shape: the keys that differ are named
    other = tmp_path / "other"
    _write_meta(other, state=_meta_state(), config=_yaml(VQGANConfig(**{**TINY.to_dict(), "num_res_blocks": 2})))
    err = _one_line_user_error(lambda: convert_vqgan(other, out), "missing")
    assert isinstance(err, CheckpointError) and "decoder.up.0.block.2.conv1.bias" in str(err)
    state = _meta_state()
    state["encoder.extra.weight"] = torch.zeros(1)
    del state["quantize.embedding.weight"]
    _write_meta(other, state=state)
    _one_line_user_error(lambda: convert_vqgan(other, out), r"unexpected 1 \(e.g. \['encoder.extra.weight'\]\)")
    # --out that is something else is never replaced
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep")
    _one_line_user_error(lambda: convert_vqgan(good, tmp_path / "precious"), "not an image tokenizer directory")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep"
    assert not out.exists()


class NotATensor:
    pass


def test_pickle_with_objects_refused(tmp_path):
    src = _write_meta(tmp_path / "meta")
    torch.save({"state_dict": _meta_state(), "callbacks": NotATensor()}, src / "vqgan.ckpt")
    err = _one_line_user_error(lambda: convert_vqgan(src, tmp_path / "out"), "non-tensor object")
    assert "NotATensor" in str(err) and "vqgan.safetensors" in str(err)
    assert not (tmp_path / "out").exists()


def test_converting_again_replaces_the_directory(converted, tmp_path):
    out = tmp_path / "vq"
    convert_vqgan(_write_meta(tmp_path / "a", state=_meta_state(seed=1)), out)
    first = vq_fingerprint(out)
    convert_vqgan(_write_meta(tmp_path / "b", state=_meta_state(seed=2)), out)
    assert vq_fingerprint(out) != first


@pytest.mark.parametrize("bad", [
    dict(ch=48),  # GroupNorm(32) needs multiples of 32
    dict(double_z=True),
    dict(in_channels=1),
    dict(resolution=33),
    dict(n_embed=1),
    dict(ch_mult=()),
    dict(attn_resolutions=(0,)),
    dict(dropout=float("nan")),
    dict(num_res_blocks=1.5),
])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        VQGANConfig(**{**TINY.to_dict(), **bad})


def test_config_dict_round_trip():
    assert VQGANConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown"):
        VQGANConfig.from_dict({**TINY.to_dict(), "codebook_size": 64})
