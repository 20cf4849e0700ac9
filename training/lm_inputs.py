"""What a decoder run starts from, read and checked before anything is trained or written: the vocabulary, the image
tokenizer and the decoder's shape (a preset's, or the ``--init-from`` run's), the context, and for ``--trainable
image-head`` which weights train."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from earlyfusion.core.checkpoint import load_json
from earlyfusion.core.errors import UserError
from earlyfusion.core.rundir import CONFIG, IMAGE_TOKENIZER_DIR, VOCAB_DIR, check_same_files, resolve_checkpoint
from earlyfusion.model.decoder import Decoder, DecoderConfig
from earlyfusion.tokenizer.vocab import Vocabulary, check_vocab_matches
from earlyfusion.training.data import pair_overhead, span_words
from earlyfusion.training.lm_config import TrainConfig
from earlyfusion.training.sizing import context_error


IMAGE_ORDINALS = 2
"""Pictures of a document with place embeddings of their own (``--image-positions``): the first, and the later ones
together, which tells a question's picture from its answer's and the first of two from the second."""


@dataclass
class Inputs:
    """What the run is made of, read and checked before anything is trained or written."""
    init: Path | None
    vocab_dir: Path
    vq_dir: Path
    vocab: Vocabulary
    decoder: DecoderConfig
    context_len: int


def read_inputs(cfg: TrainConfig) -> Inputs:
    """The vocabulary, image tokenizer and decoder shape of the run, checked against each other and the context."""
    init, vocab_dir, vq_dir = init_source(cfg)
    vocab = Vocabulary.load(vocab_dir)
    check_vocab_matches(vocab, vq_dir, f"--vocab {vocab_dir} vs --image-tokenizer {vq_dir}")
    dcfg = decoder_config(cfg, vocab, init)
    if cfg.trainable == "image-head" and dcfg.tie_embeddings:
        raise UserError("--trainable image-head needs a separate output layer, but this decoder ties it to the token "
                        "embedding; use --trainable all")
    context_len = cfg.context_len or dcfg.max_seq_len
    if context_len > dcfg.max_seq_len:
        raise UserError(f"--context-len {context_len} exceeds the decoder's max_seq_len {dcfg.max_seq_len}")
    inputs = Inputs(init, vocab_dir, vq_dir, vocab, dcfg, context_len)
    if context_len < pair_overhead(vocab):
        raise too_short(cfg, inputs, pair_overhead(vocab), f"one image (<s> {span_words(vocab)} </s>)")
    return inputs


def too_short(cfg: TrainConfig, inputs: Inputs, need: int, what: str) -> UserError:
    return UserError(context_error(context_len=inputs.context_len, given=cfg.context_len is not None,
                                   max_seq_len=inputs.decoder.max_seq_len, preset=cfg.preset, need=need, what=what))


def init_source(cfg: TrainConfig) -> tuple[Path | None, Path, Path]:
    """(the --init-from checkpoint or None, vocabulary dir, image tokenizer dir) of this run.

    With --init-from the run's own vocabulary and image tokenizer are used; a --vocab given as well must be that
    vocabulary (the image tokenizer is then checked against it like any other).
    """
    if cfg.init_from is None:
        return None, Path(cfg.vocab), Path(cfg.image_tokenizer)
    root, ckpt = resolve_checkpoint(cfg.init_from)
    for sub in (VOCAB_DIR, IMAGE_TOKENIZER_DIR):
        if not (root / sub).is_dir():
            raise UserError(f"--init-from {cfg.init_from}: {root / sub} is missing; pass a whole run directory "
                            "(from `earlyfusion train` or `earlyfusion import chameleon`)")
    vocab_dir = Path(cfg.vocab) if cfg.vocab else root / VOCAB_DIR
    if cfg.vocab:
        check_same_files(vocab_dir, root / VOCAB_DIR, f"--vocab is not the vocabulary of --init-from {root}",
                    "leave --vocab out to use the run's own", files=("layout.json", "tokenizer.json"))
    return ckpt, vocab_dir, Path(cfg.image_tokenizer) if cfg.image_tokenizer else root / IMAGE_TOKENIZER_DIR


def decoder_config(cfg: TrainConfig, vocab: Vocabulary, init: Path | None) -> DecoderConfig:
    """The decoder's shape: the preset's, or the --init-from checkpoint's (which an explicit --preset must match);
    --dropout overrides either."""
    overrides = {} if cfg.dropout is None else {"dropout": cfg.dropout}
    if init is None:
        if cfg.image_positions:
            overrides.update(image_positions=vocab.max_span - 1, image_ordinals=IMAGE_ORDINALS, boi_id=vocab.boi,
                             eoi_id=vocab.eoi)
        return DecoderConfig.from_preset(cfg.preset, vocab.vocab_size, **overrides)
    saved = DecoderConfig.from_dict(load_json(init / CONFIG)["decoder"])
    if cfg.image_positions is not None and cfg.image_positions != bool(saved.image_positions):
        raise UserError(f"--{'' if cfg.image_positions else 'no-'}image-positions: the decoder of --init-from {init} "
                        f"was trained {'without' if cfg.image_positions else 'with'} them; leave the option out")
    if saved.vocab_size != vocab.vocab_size:
        raise UserError(f"{init / CONFIG}: decoder vocab_size {saved.vocab_size} != {vocab.vocab_size} of its "
                        "vocabulary; the run directory was altered, import or train it again")
    if cfg.preset is not None:
        want = DecoderConfig.from_preset(cfg.preset, vocab.vocab_size, dropout=saved.dropout).to_dict()
        diffs = [f"{k} {v} (run {getattr(saved, k)})" for k, v in want.items() if getattr(saved, k) != v]
        if diffs:
            raise UserError(f"--preset {cfg.preset} is not the shape of --init-from {init}: {', '.join(diffs)}; "
                            "leave --preset out to train the run's shape")
    return replace(saved, **overrides)


def freeze_to_image_head(model: Decoder) -> None:
    """--trainable image-head: only the output layer trains (its image-id rows, see ``mask_to_image_head``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.output.weight.requires_grad_(True)


def mask_to_image_head(model: Decoder, image_ids: range) -> None:
    """Zero the output layer's gradient outside the image ids' rows (the weight is nn.Linear's (vocab_size, dim)), so
    that AdamW (no weight decay here) leaves every other row exactly as it was."""
    grad = model.output.weight.grad
    if grad is not None:
        grad[:image_ids.start] = 0
        grad[image_ids.stop:] = 0
