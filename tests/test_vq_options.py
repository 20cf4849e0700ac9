"""Image tokenizer shapes from options (presets, overrides, --set), the photograph architecture (attention, any
grid), FSQ, and the perceptual / adversarial training losses."""

import json
import math
from dataclasses import replace

import pytest
import torch

from earlyfusion.core.checkpoint import write_manifest
from earlyfusion.core.errors import UserError
from earlyfusion.tokenizer.vq_presets import parse_sets, resolve_vq_config
from earlyfusion.tokenizer.vq_presets import VQ_PRESETS
from earlyfusion.tokenizer.vqvae import VQVAE
from earlyfusion.tokenizer.vq_config import VQConfig
from earlyfusion.tokenizer.vq_checkpoint import load_vqvae, read_vq_config, save_vqvae
from earlyfusion.training.vq_losses import (Adversarial, PatchDiscriminator, PerceptualLoss, adaptive_weight,
                                            hinge_d_loss)

# a photograph-style model small enough for tests: 32 px, 4x downsampling, a whole-image encoder with attention at
# the lowest resolution (the architecture of the published shapes)
SMALL = dict(image_size=32, downsample=4, width=16, sets={"latent_dim": 16, "kmeans_iters": 2, "decoder_res_blocks": 1,
                                                         "encoder_reach": None, "attention": True})


def _small(**kw) -> VQConfig:
    if "quantizer" not in kw:
        kw.setdefault("codebook_size", 64)
    return resolve_vq_config("photo64", **{**SMALL, **kw})


# ---------------------------------------------------------------- presets and options


def test_presets_have_the_published_shapes():
    assert VQ_PRESETS["default"] == VQConfig() and VQ_PRESETS["default"].grid_size == (4, 4)
    p = VQ_PRESETS["photo64"]
    assert p.image_size == 64 and p.grid_size == (8, 8) and not p.attention and p.encoder_reach == 1
    p16 = resolve_vq_config("photo64", downsample=4)
    assert p16.grid_size == (16, 16) and p16.patch_size == 4 and p16.channels == (128,)  # one patch per code
    assert VQ_PRESETS["photo256"].attention and VQ_PRESETS["chameleon512"].encoder_reach is None
    v = VQ_PRESETS["photo256"]
    assert (v.image_size, v.downsample, v.grid_size, v.codebook_size, v.codebook_dim) == (256, 16, (16, 16), 16384, 8)
    c = VQ_PRESETS["chameleon512"]
    assert (c.image_size, c.downsample, c.grid_size, c.codebook_size) == (512, 16, (32, 32), 8192)


def test_no_options_is_the_preset_itself():
    for name, cfg in VQ_PRESETS.items():
        assert resolve_vq_config(name) == cfg


def test_options_override_and_rederive_levels(monkeypatch):
    cfg = resolve_vq_config("photo256", image_size=128, downsample=32, codebook_size=4096, codebook_dim=16, width=64, depth=1)
    assert cfg.grid_size == (4, 4) and cfg.codebook_size == 4096 and cfg.codebook_dim == 16
    assert cfg.channels == (64, 64, 128, 128, 256, 256)  # the preset's multipliers (1, 1, 2, 2, 4), the last repeated
    assert (cfg.res_blocks, cfg.decoder_res_blocks) == (1, 2)
    assert resolve_vq_config("photo256", downsample=4).channels == (128, 128, 256)
    p = resolve_vq_config("photo256", downsample=2)
    assert p.patch_size == 1 and p.channels == (128, 128)
    monkeypatch.setitem(VQ_PRESETS, "stem4", replace(VQ_PRESETS["photo256"], patch_size=4, channels=(128, 128, 256)))
    p = resolve_vq_config("stem4", downsample=2)
    assert p.patch_size == 2 and p.channels == (128,)  # the patch stem never exceeds the downsampling
    # the local-encoder presets keep one patch per code
    d = resolve_vq_config("default", downsample=4, image_size=16)
    assert d.patch_size == 4 and d.grid_size == (4, 4) and d.encoder_reach == 0


def test_set_is_typed_from_the_dataclass():
    got = parse_sets(["attention=false", "channels=32,64", "encoder_reach=none", "ema_decay=0.9", "quantizer=fsq",
                      "codebook-size=12"])
    assert got == {"attention": False, "channels": (32, 64), "encoder_reach": None, "ema_decay": 0.9, "quantizer": "fsq",
                   "codebook_size": 12}
    cfg = resolve_vq_config("photo64", sets=parse_sets(["channels=32", "norm_groups=8", "ema_decay=0.95"]))
    assert cfg.channels == (32,) and cfg.ema_decay == 0.95


@pytest.mark.parametrize("items, match", [
    (["mystery=1"], "not an image tokenizer field"),
    (["latent_dim=abc"], "expected int"),
    (["attention=maybe"], "true or false"),
    (["quantizer=lfq"], "one of"),
    (["ema_decay=nan"], "finite"),
    (["latent_dim"], "field=value"),
])
def test_set_errors(items, match):
    with pytest.raises(ValueError, match=match):
        parse_sets(items)


@pytest.mark.parametrize("kw, match", [
    (dict(image_size=60), "multiple"),
    (dict(downsample=6), "power of two"),
    (dict(width=20), "multiple of 16"),
    (dict(codebook_dim=128), "codebook_dim"),
    (dict(sets={"attention": True, "encoder_reach": 0, "patch_size": 8}), "attention"),
])
def test_bad_shapes_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        resolve_vq_config("photo64", **kw)


@pytest.mark.parametrize("argv", [
    ["--set", "mystery=1"], ["--downsample", "6"], ["--image-size", "60"], ["--preset", "huge"],
    ["--quantizer", "fsq", "--fsq-levels", "8,x"], ["--quantizer", "fsq", "--fsq-levels", "8,5", "--codebook-size", "64"],
])
def test_cli_bad_shape_options_exit_2_with_one_line(argv, tmp_path, capsys):
    from earlyfusion.cli import main

    code = main(["tokenizer", "train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--preset", "photo64", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("earlyfusion: error:"), err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the photograph architecture


def _trained(cfg: VQConfig, seed: int = 0) -> VQVAE:
    torch.manual_seed(seed)
    m = VQVAE(cfg)
    m.train()
    m(torch.rand(4, 3, cfg.image_size, cfg.image_size) * 2 - 1)  # k-means init
    return m.eval()


def test_any_grid_up_to_image_size():
    cfg = _small()
    m = _trained(cfg)
    x = torch.rand(2, 3, 24, 32) * 2 - 1  # 6 x 8 codes
    codes = m.encode(x)
    assert codes.shape == (2, 6, 8)
    assert m.decode(codes).shape == (2, 3, 24, 32)
    for bad in [(2, 3, 26, 32), (2, 3, 36, 32), (2, 1, 32, 32)]:
        with pytest.raises(ValueError, match="shape"):
            m.encode(torch.zeros(bad))


def test_attention_lets_every_code_see_the_whole_image():
    cfg = _small()
    enc = VQVAE(cfg).encoder.eval()
    assert hasattr(enc, "mid")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = x.clone()
    y[:, :, :4, :4] = -x[:, :, :4, :4]  # change only the top-left patch
    changed = (enc(x) - enc(y)).abs().amax(dim=1)[0] > 1e-6  # (8, 8)
    assert changed.all()


def test_photo_model_round_trip_and_old_configs_load(tmp_path):
    cfg = _small()
    m = _trained(cfg)
    save_vqvae(m, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["attention"] is True and raw["grid"] == [8, 8]
    assert read_vq_config(tmp_path) == cfg
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(load_vqvae(tmp_path).encode(x), m.encode(x))
    # a config.json written before the attention / quantizer fields existed still loads, as the model it described
    old = _trained(VQ_PRESETS["tiny"])
    d = tmp_path / "old"
    save_vqvae(old, d)
    raw = json.loads((d / "config.json").read_text())
    for key in ("attention", "quantizer", "fsq_levels"):
        raw.pop(key)
    (d / "config.json").write_text(json.dumps(raw))
    write_manifest(d, ["model.safetensors", "config.json"])
    assert read_vq_config(d) == VQ_PRESETS["tiny"]
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(load_vqvae(d).encode(y), old.encode(y))


# ---------------------------------------------------------------- FSQ


def test_fsq_codebook_is_the_product_of_levels():
    cfg = _small(quantizer="fsq", fsq_levels=(5, 4, 3))
    assert cfg.codebook_size == 60 and cfg.quantizer == "fsq"
    with pytest.raises(ValueError, match="disagrees"):
        _small(quantizer="fsq", fsq_levels=(5, 4, 3), codebook_size=64)
    with pytest.raises(ValueError, match="fsq_levels"):
        _small(quantizer="fsq")
    with pytest.raises(ValueError, match="product"):
        replace(cfg, codebook_size=61)


def test_fsq_encode_decode_fp32_under_autocast(tmp_path):
    cfg = _small(quantizer="fsq", fsq_levels=(5, 4, 3))
    torch.manual_seed(0)
    m = VQVAE(cfg).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    codes = m.encode(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 60
    recon, fcodes, aux = m(x)
    assert torch.equal(fcodes, codes) and float(aux) == 0.0
    torch.testing.assert_close(recon.clamp(-1, 1), m.decode(codes))  # decode(encode(x)) is what forward reconstructs
    seen = {}
    hook = m.quantizer.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0].dtype, out=out[0].dtype))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x)
    finally:
        hook.remove()
    assert seen == {"inp": torch.float32, "out": torch.float32}
    save_vqvae(m, tmp_path)
    assert torch.equal(load_vqvae(tmp_path).encode(x), codes)


# ---------------------------------------------------------------- perceptual loss


def write_vgg_standin(path, widths=(4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8), seed=0, drop=None, in_channels=3):
    """A random VGG16-shaped state dict (torchvision's names) with tiny widths, plus a classifier key to ignore."""
    from safetensors.torch import save_file

    from earlyfusion.training.vq_losses import _vgg_indices

    g = torch.Generator().manual_seed(seed)
    tensors, c_prev = {}, in_channels
    for i, c in zip(_vgg_indices()[0], widths):
        tensors[f"features.{i}.weight"] = torch.randn(c, c_prev, 3, 3, generator=g) * 0.3
        tensors[f"features.{i}.bias"] = torch.randn(c, generator=g) * 0.1
        c_prev = c
    tensors["classifier.0.weight"] = torch.zeros(2, 2)
    if drop:
        tensors.pop(drop)
    save_file(tensors, str(path))
    return path


def test_perceptual_loss_from_a_standin_file(tmp_path):
    loss = PerceptualLoss.from_file(write_vgg_standin(tmp_path / "vgg.safetensors"))
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape)).clamp(-1, 1)
    assert float(loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(a, b)) > 0
    assert float(loss(a, (a + 0.05 * torch.randn(a.shape)).clamp(-1, 1))) < float(loss(a, b))
    b.requires_grad_(True)
    loss(b, a).backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.parameters())
    assert float(loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))) > 0  # small images use the taps that fit


@pytest.mark.parametrize("kind", ["missing", "key", "shape", "garbage"])
def test_perceptual_weights_errors_are_one_line(tmp_path, kind):
    path = tmp_path / "vgg.safetensors"
    if kind == "key":
        write_vgg_standin(path, drop="features.28.bias")
    elif kind == "shape":
        write_vgg_standin(path, in_channels=1)
    elif kind == "garbage":
        path.write_bytes(b"not safetensors at all")
    with pytest.raises(UserError) as e:
        PerceptualLoss.from_file(path)
    assert len(str(e.value).splitlines()) == 1 and str(path) in str(e.value)


# ---------------------------------------------------------------- adversarial loss


def test_hinge_and_adaptive_weight():
    assert float(hinge_d_loss(torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0))) == 0.0
    assert float(hinge_d_loss(torch.zeros(1), torch.zeros(1))) == pytest.approx(1.0)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    rec, gan = (x @ w).square().mean(), (x @ w).mean()
    g_rec, = torch.autograd.grad(rec, w, retain_graph=True)
    g_gan, = torch.autograd.grad(gan, w, retain_graph=True)
    expect = g_rec.norm() / (g_gan.norm() + 1e-4)
    torch.testing.assert_close(adaptive_weight(rec, gan, w), expect)
    assert not adaptive_weight(rec, gan, w).requires_grad


@pytest.mark.parametrize("size", [16, 32, 64])
def test_patch_discriminator_any_size(size):
    d = PatchDiscriminator(size)
    out = d(torch.rand(2, 3, size, size))
    assert out.ndim == 4 and out.shape[:2] == (2, 1) and out.shape[-1] >= 2


def test_discriminator_step_separates_real_from_fake():
    torch.manual_seed(0)
    adv = Adversarial(16, lr=2e-3)
    real = torch.rand(8, 3, 16, 16) * 0.2 + 0.6
    fake = torch.rand(8, 3, 16, 16) * 0.2 - 0.8
    hooks = (lambda loss: loss.backward(), lambda p: torch.nn.utils.clip_grad_norm_(p, 1.0), lambda v: v)
    first = adv.discriminator_step(real, fake, 2e-3, *hooks)
    for _ in range(20):
        last = adv.discriminator_step(real, fake, 2e-3, *hooks)
    assert last < first and math.isfinite(last)
    # the generator's term pushes reconstructions towards what D calls real, and leaves D's weights alone
    recon = fake.clone().requires_grad_(True)
    term, parts = adv.generator_loss(recon, recon.square().mean(), recon, 0.5)
    term.backward()
    assert recon.grad is not None and all(p.grad is None for p in adv.disc.parameters())
    assert set(parts) == {"gan", "gan_weight"}
