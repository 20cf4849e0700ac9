"""VQ-VAE image tokenizer: shapes, code ranges, fp32 quantizer, checkpoint round trip and strict loading."""

import json
from dataclasses import replace

import pytest
import torch

from earlyfusion.core.errors import CheckpointError
from earlyfusion.tokenizer.vq_presets import VQ_PRESETS
from earlyfusion.tokenizer.vqvae import VQVAE
from earlyfusion.tokenizer.vq_config import VQConfig
from earlyfusion.tokenizer.vq_checkpoint import load_vqvae, read_vq_config, save_vqvae, vq_fingerprint

TINY = VQ_PRESETS["tiny"]


def _model(seed: int = 0, cfg: VQConfig = TINY) -> VQVAE:
    torch.manual_seed(seed)
    m = VQVAE(cfg)
    x = torch.rand(8, 3, cfg.image_size, cfg.image_size) * 2 - 1
    m.train()
    m(x)  # k-means initialisation of the codebook + one EMA update
    return m.eval()


def _pixels(n: int = 4, cfg: VQConfig = TINY, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1


def test_presets_grid():
    assert VQ_PRESETS["default"].image_size == 32 and VQ_PRESETS["default"].grid_size == (4, 4)
    assert TINY.grid_size == (TINY.image_size // TINY.downsample,) * 2
    for cfg in VQ_PRESETS.values():
        assert 8 <= cfg.codebook_dim <= 32  # low-dimensional lookup against collapse
        assert cfg.dead_code_threshold >= 1


@pytest.mark.parametrize("bad", [
    dict(image_size=30),  # not divisible by downsample
    dict(downsample=3, patch_size=1, channels=(8, 8), encoder_reach=None),  # not a power of two
    dict(patch_size=8),  # larger than downsample
    dict(patch_size=2, channels=(8, 16)),  # local encoder needs one patch per code
    dict(patch_size=2, channels=(8, 16, 16), encoder_reach=None),  # wrong number of levels
    dict(codebook_dim=64),  # larger than latent_dim
    dict(dead_code_threshold=0.0),  # dead-code replacement off
    dict(channels=(8, 18)),  # not divisible by norm groups
])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        replace(TINY, **bad)


def test_encode_decode_shapes_dtypes_and_range():
    m = _model()
    x = _pixels(5)
    codes = m.encode(x)
    assert codes.shape == (5, *TINY.grid_size) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < TINY.codebook_size
    y = m.decode(codes)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= -1 and float(y.max()) <= 1
    # decode(encode(x)) is what forward reconstructs in eval mode
    recon, fcodes, aux = m(x)
    assert torch.equal(fcodes, codes)
    torch.testing.assert_close(recon.clamp(-1, 1), y)


def test_encode_does_not_touch_codebook():
    m = _model()
    m.train()  # even in training mode encode must not update the EMA codebook
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.encode(_pixels(6))
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_inputs_raise():
    m = _model()
    with pytest.raises(ValueError, match="shape"):
        m.encode(torch.zeros(1, 3, TINY.image_size + 4, TINY.image_size + 4))
    with pytest.raises(ValueError, match="codes must be in"):
        m.decode(torch.full((1, *TINY.grid_size), TINY.codebook_size))
    with pytest.raises(ValueError, match="integer"):
        m.decode(torch.zeros(1, *TINY.grid_size))


def test_quantizer_fp32_under_autocast():
    m = _model()
    seen = {}
    hook = m.quantizer.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0].dtype, out=out[0].dtype))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = m.encoder(_pixels(2))
            recon, codes, aux = m(_pixels(2))
    finally:
        hook.remove()
    assert z.dtype == torch.bfloat16  # the conv net does run in bf16 ...
    assert seen == {"inp": torch.float32, "out": torch.float32}  # ... the code lookup in fp32
    assert aux.dtype == torch.float32 and codes.dtype == torch.long


def test_training_updates_ema_codebook_buffers_in_state_dict():
    m = _model()
    keys = [k for k in m.state_dict() if k.startswith("quantizer._codebook.")]
    assert {"quantizer._codebook.embed", "quantizer._codebook.embed_avg", "quantizer._codebook.cluster_size",
            "quantizer._codebook.initted"} <= set(keys)
    before = m.state_dict()["quantizer._codebook.embed_avg"].clone()
    m.train()
    m(_pixels(8, seed=5))
    assert not torch.equal(before, m.state_dict()["quantizer._codebook.embed_avg"])


def test_save_load_round_trip_identical(tmp_path):
    m = _model()
    save_vqvae(m, tmp_path, extra={"step": 3})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["codebook_size"] == TINY.codebook_size and cfg["grid"] == list(TINY.grid_size)
    m2 = load_vqvae(tmp_path)
    assert not m2.training
    x = _pixels(4)
    codes = m.encode(x)
    assert torch.equal(codes, m2.encode(x))
    assert torch.equal(m.decode(codes), m2.decode(codes))
    assert read_vq_config(tmp_path) == TINY


def test_fingerprint_tracks_weights_and_config(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save_vqvae(_model(0), a, extra={"step": 1})
    save_vqvae(_model(0), b, extra={"step": 2})  # same weights; training notes do not count
    assert vq_fingerprint(a) == vq_fingerprint(b)
    save_vqvae(_model(1), b)
    assert vq_fingerprint(a) != vq_fingerprint(b)


def test_wrong_config_raises_checkpoint_error(tmp_path):
    save_vqvae(_model(), tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    cfg["codebook_size"] = TINY.codebook_size * 2
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json") as e:
        load_vqvae(tmp_path)
    assert "model.safetensors" in str(e.value)


@pytest.mark.parametrize("edit", [
    lambda c: c.update(image_size=30),  # invalid value
    lambda c: c.update(mystery=1),  # unknown key
    lambda c: c.pop("codebook_size"),  # not a tokenizer config
])
def test_invalid_config_file_named(tmp_path, edit):
    save_vqvae(_model(), tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=str(path)):
        load_vqvae(tmp_path)


def test_truncated_weights_raise_checkpoint_error_naming_file(tmp_path):
    save_vqvae(_model(), tmp_path)
    w = tmp_path / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=str(w)):
        load_vqvae(tmp_path)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_vqvae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_vqvae(tmp_path / "empty")


@pytest.mark.parametrize("reach", [0, 1])
def test_codes_depend_only_on_patches_within_reach(reach):
    """encoder_reach r: a code is a function of the patches within r of it, nothing else in the image."""
    cfg = replace(VQ_PRESETS["default"], downsample=4, patch_size=4, encoder_reach=reach, channels=(32,), latent_dim=16,
                  codebook_dim=8, codebook_size=16)
    torch.manual_seed(0)
    enc = VQVAE(cfg).encoder.eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = x.clone()
    y[:, :, 28:, 28:] = -x[:, :, 28:, 28:]  # change only the bottom-right patch (grid cell 7, 7)
    d = (enc(x) - enc(y)).abs().amax(dim=1)[0]  # (8, 8) change per code position
    changed = d > 1e-6
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[7 - reach:, 7 - reach:] = True
    assert torch.equal(changed, expect), changed


def test_flipped_weight_bytes_are_refused_everywhere(tmp_path):
    """The top-level weights carry a checksum: a flipped byte is refused by every reader (load, fingerprint), and the
    refusal names the run's newest good step checkpoint, which loads."""
    save_vqvae(_model(), tmp_path)
    weights = tmp_path / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF  # inside the tensor data: still a valid safetensors file
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_vqvae(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        vq_fingerprint(tmp_path)
    from earlyfusion.core.checkpoint import atomic_dir, step_dir

    good = _model()
    with atomic_dir(step_dir(tmp_path / "checkpoints", 7)) as d:
        save_vqvae(good, d)
    with pytest.raises(CheckpointError, match="step-00000007"):
        load_vqvae(tmp_path)
    x = _pixels(2)
    assert torch.equal(load_vqvae(step_dir(tmp_path / "checkpoints", 7)).encode(x), good.encode(x))
