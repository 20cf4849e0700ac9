"""Named VQ-VAE shapes, and the options that change one: ``VQ_PRESETS`` and ``resolve_vq_config``.

A preset is a full ``VQConfig``. The options people change (image size, downsampling, codebook size and
dimension, encoder width and depth, the quantizer) are applied on top of it, re-deriving what depends on
them: the number of resolution levels (one per halving after the patch stem) and the channels per level
(the preset's channel multipliers over ``width``, the last one repeated for extra levels). ``--set
field=value`` pairs come last and can set any field, typed from the dataclass.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields, replace

from earlyfusion.tokenizer.vq_config import MIN_GRID, VQConfig

VQ_PRESETS: dict[str, VQConfig] = {
    # tests: 16 px -> 4x4 codes, a few thousand parameters
    "tiny": VQConfig(image_size=16, downsample=4, patch_size=4, channels=(16,), res_blocks=1, decoder_res_blocks=1,
                     latent_dim=16, codebook_size=32, codebook_dim=8, norm_groups=4, kmeans_iters=4),
    # built-in 32 px shapes data -> 4x4 = 16 codes per image, one per 8x8 px patch
    "default": VQConfig(),
    # photographs at 64 px -> 8x8 codes (16x16 with downsample 4), trained on a CPU in minutes: each code sees its
    # own patch and the eight around it, and the pixel decoder (residual conv stages) sees every code. Trained on a
    # few photographs, a whole-image encoder with attention learns those photographs: it reconstructs unseen ones
    # no better and trains several times slower on a CPU. For the whole-image encoder: --set encoder_reach=none
    # attention=true
    "photo64": VQConfig(image_size=64, downsample=8, patch_size=8, channels=(128,), encoder_reach=1,
                        res_blocks=1, decoder_res_blocks=2, latent_dim=64, codebook_size=1024, codebook_dim=8,
                        ema_decay=0.8, norm_groups=16, attention=False),
    # LlamaGen VQ-16's shape: 256 px -> 16x16 codes of 16384, l2-normalised codes of dimension 8
    "photo256": VQConfig(image_size=256, downsample=16, patch_size=1, channels=(128, 128, 256, 256, 512),
                         encoder_reach=None, res_blocks=2, decoder_res_blocks=3, latent_dim=256, codebook_size=16384,
                         codebook_dim=8, ema_decay=0.99, norm_groups=32, attention=True),
    # Chameleon's shape: 512 px -> 32x32 codes of 8192, 16x downsampling
    "chameleon512": VQConfig(image_size=512, downsample=16, patch_size=1, channels=(128, 128, 256, 256, 512),
                             encoder_reach=None, res_blocks=2, decoder_res_blocks=3, latent_dim=256, codebook_size=8192,
                             codebook_dim=8, ema_decay=0.99, norm_groups=32, attention=True),
}


def _channels(base: VQConfig, levels: int, width: int) -> tuple[int, ...]:
    """Channels for ``levels`` levels: the preset's multipliers of its first level, scaled to ``width``."""
    mult = [c / base.channels[0] for c in base.channels]
    mult += [mult[-1]] * (levels - len(mult))
    return tuple(max(1, round(width * m)) for m in mult[:levels])


def parse_fsq_levels(text: str) -> tuple[int, ...]:
    """'8,8,8,5,5,5' -> (8, 8, 8, 5, 5, 5); ValueError naming the option otherwise."""
    try:
        levels = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise ValueError(f"--fsq-levels must be comma-separated integers such as 8,8,8,5,5,5, got {text!r}") from None
    if any(v < 3 for v in levels):
        raise ValueError(f"--fsq-levels entries must be at least 3, got {text!r}")
    return levels


def _typed(name: str, tp, text: str):
    """The value of ``--set name=text`` converted to the field's type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _typed(name, inner[0], text)
    if origin is typing.Literal:
        if text not in args:
            raise ValueError(f"--set {name}: must be one of {', '.join(map(str, args))}, got {text!r}")
        return text
    if origin is tuple:
        return tuple(_typed(name, args[0], v) for v in text.replace(" ", "").split(",") if v)
    if tp is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"--set {name}: must be true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    try:
        value = tp(text)
    except ValueError:
        raise ValueError(f"--set {name}: expected {tp.__name__}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"--set {name}: must be a finite number, got {text!r}")
    return value


def parse_sets(items: list[str] | None) -> dict:
    """``["field=value", ...]`` -> {field: typed value}; ValueError on an unknown field or a bad value."""
    hints = typing.get_type_hints(VQConfig)
    names = [f.name for f in fields(VQConfig)]
    out = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ValueError(f"--set takes field=value, got {item!r}")
        if name not in names:
            raise ValueError(f"--set {name}: not an image tokenizer field; the fields are {', '.join(names)}")
        out[name] = _typed(name, hints[name], text.strip())
    return out


def resolve_vq_config(preset: str, *, image_size: int | None = None, downsample: int | None = None,
                      codebook_size: int | None = None, codebook_dim: int | None = None, width: int | None = None,
                      depth: int | None = None, quantizer: str | None = None, fsq_levels: tuple[int, ...] | None = None,
                      sets: dict | None = None) -> VQConfig:
    """The preset's config with the given options applied (None = the preset's value), then ``sets``.

    ``width`` is the channel count of the first level, ``depth`` the encoder's residual blocks per level (the
    decoder gets one more, as in VQGAN). With the fsq quantizer the codebook size is the product of the levels;
    a different ``codebook_size`` given with it is an error. Raises ValueError (one line) on a bad combination.
    """
    if preset not in VQ_PRESETS:
        raise ValueError(f"--preset {preset!r} is not one of {', '.join(VQ_PRESETS)}")
    base = VQ_PRESETS[preset]
    sets = dict(sets or {})
    ds = base.downsample if downsample is None else downsample
    if ds < 1 or ds & (ds - 1):
        raise ValueError(f"--downsample must be a power of two, got {ds}")
    size = base.image_size if image_size is None else image_size
    if size < 1 or size % ds:
        raise ValueError(f"--image-size {size} must be a positive multiple of the downsampling {ds}")
    patch = ds if base.encoder_reach is not None else min(base.patch_size, ds)
    levels = int(math.log2(ds // patch)) + 1
    w = base.channels[0] if width is None else width
    if w < 1 or w % base.norm_groups:
        raise ValueError(f"--width must be a positive multiple of {base.norm_groups} (the preset's GroupNorm groups), got {w}")
    changes = dict(image_size=size, downsample=ds, patch_size=patch)
    if levels != len(base.channels) or width is not None:
        changes["channels"] = _channels(base, levels, w)
    if depth is not None:
        if depth < 0:
            raise ValueError(f"--depth must be >= 0, got {depth}")
        changes.update(res_blocks=depth, decoder_res_blocks=depth + 1)
    if codebook_dim is not None:
        changes["codebook_dim"] = codebook_dim
    if quantizer is not None:
        changes["quantizer"] = quantizer
    if fsq_levels is not None:
        changes["fsq_levels"] = tuple(fsq_levels)
    changes.update(sets)
    if codebook_size is not None:
        changes["codebook_size"] = codebook_size
    if changes.get("quantizer", base.quantizer) == "fsq":
        levels_fsq = changes.get("fsq_levels", base.fsq_levels)
        product = math.prod(levels_fsq) if levels_fsq else 0
        given = changes.get("codebook_size")
        if given is not None and levels_fsq and given != product:
            raise ValueError(f"--codebook-size {given} disagrees with --fsq-levels {','.join(map(str, levels_fsq))} "
                             f"(product {product}); with the fsq quantizer give only the levels")
        if product:
            changes["codebook_size"] = product
    cfg = replace(base, **changes)
    if min(cfg.grid_size) < MIN_GRID:
        rows, cols = cfg.grid_size
        raise ValueError(f"--image-size {cfg.image_size} with --downsample {cfg.downsample} gives a {rows}x{cols} code grid; "
                         f"an image needs at least {MIN_GRID}x{MIN_GRID} codes: use --image-size "
                         f"{MIN_GRID * cfg.downsample} or more, or a smaller --downsample")
    return cfg
