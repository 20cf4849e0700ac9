"""Training the unified decoder: ``earlyfusion train``.

One accelerate loop for one CPU and for ``accelerate launch`` on many processes, on the shared
skeleton of ``training.loop``. Every optimizer step consumes one *global* batch from
``training.data.training_batches`` (deterministic for the seed); each process takes its rows, and the
loss is normalised by the global number of target tokens, so N processes compute the same update as
one process with the same global batch.

Exact resume: a checkpoint holds the weights, the optimizer state, the step, the data iterator's
state and the torch RNG state (dropout); the LR is a pure function of the step. On CPU a resumed
run reproduces the uninterrupted run's losses bit for bit (tested). The run's identity (decoder
shape, data, seed, batch size, context length) is recorded in each checkpoint's config; ``--resume``
with other values is refused, and so is a new run into a directory that already holds one.

Validation scores held-out pairs every ``--eval-every`` steps; the weights with the lowest held-out loss are
kept in LMRUN/checkpoints/best (``training.best``) and are the run's model unless ``--final last``. At start the run
checks that its context holds every image-caption pair of the data and says how many epochs its steps
make (``training.sizing``); the longest image span (``Vocabulary.max_span``) is what one image needs. With a
grid-token vocabulary each checkpoint's config.json lists the code grids trained on (``rundir.trained_grids``).

Non-finite guard: a step whose loss or gradient norm is not finite is skipped (no update) and
counted; more than ``max_nonfinite`` in a row stops the run, leaving the last good checkpoint. The
last step is always checkpointed, skipped or not.

``--init-from RUN`` starts from another run's decoder weights (ours, or an imported Chameleon/Anole
run) with that run's shape, vocabulary and image tokenizer; ``--trainable image-head`` then trains only
the output-layer columns of the image ids and leaves every other weight exactly as it was.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from earlyfusion.checkpoint import (
    MANIFEST, copy_dir, latest_good, load_json, load_state, load_weights, save_state, sha256_file,
)
from earlyfusion.errors import UserError
from earlyfusion.logs import log
from earlyfusion.model.attention_plan import attention_plan
from earlyfusion.model.compile import compiled
from earlyfusion.model.decoder import DECODER_PRESETS, Decoder, DecoderConfig
from earlyfusion.options import MAX_BATCH, MAX_SEED, check_not_file, check_number
from earlyfusion.rundir import (
    BEST_DIR, CHECKPOINTS_DIR, CONFIG, IMAGE_GRIDS, IMAGE_TOKENIZER_DIR, VOCAB_DIR, WEIGHTS, check_vocab_matches,
    resolve_checkpoint, set_final, write_decoder,
)
from earlyfusion.runtime import autocast, mixed_precision, use_all_cores
from earlyfusion.tokenizer.vocab import Vocabulary
from earlyfusion.training.best import BestModel, heldout_score
from earlyfusion.training.data import (
    ContextTooShort, DataConfig, PackedBatches, heldout_pairs, noisy_image_codes, pair_overhead, span_words,
    training_batches,
)
from earlyfusion.training.lm_loss import TokenLosses, lm_loss
from earlyfusion.training.loop import (
    TrainLoop, check_identity, source_key, warmup_cosine_lr,
)
from earlyfusion.training.sizing import SIZED_IMAGE_TOKEN_NOISE, context_error, pair_passes, repeats_too_often, say_epochs

MIN_CONTEXT = 8
"""The shortest --context-len accepted (the trainer also checks that one image document fits)."""


@dataclass
class TrainConfig:
    data: DataConfig
    """The training data and how its documents are drawn (the --data, --reading-ratio, ... options)."""
    out: str
    """Run directory (LMRUN): checkpoints, metrics.jsonl, sample sheets; self-contained for sampling."""
    image_tokenizer: str | None = None
    """Image tokenizer run directory (from `earlyfusion tokenizer train`); optional with an init run (`--init-from`),
    whose own is then used."""
    vocab: str | None = None
    """Vocabulary directory (from `earlyfusion vocab build`), built for this image tokenizer; optional with an init run
    (`--init-from`), whose own is then used."""
    init_from: str | None = None
    """Run directory (or one of its checkpoints/step-* directories) whose decoder weights start this run: ours or an
    imported Chameleon/Anole run. Its vocabulary and image tokenizer are used; a `--vocab` or `--image-tokenizer`
    given as well must match them."""
    trainable: Literal["all", "image-head"] = "all"
    """Which weights train: all, or image-head = only the output-layer rows of the image ids (Anole's recipe for
    teaching a text-only checkpoint to draw; every other weight stays exactly as the init run's)."""
    preset: str | None = None
    """Decoder size preset: tiny (tests), small (CPU demo), base (~100M), chameleon-7b. Unset = small, or the shape of
    the init run (a preset given with `--init-from` must describe that shape)."""
    steps: int = 1600
    """Optimizer steps."""
    batch_size: int = 8
    """Global batch: packed sequences per optimizer step (over all processes). The small demo decoder learns more
    from the same tokens in smaller batches of more steps (README.md compares them)."""
    micro_batch_size: int | None = None
    """Sequences per forward pass per process; unset = the whole per-process share (no accumulation). Lower it when
    a batch does not fit in memory."""
    context_len: int | None = None
    """Packed sequence length; unset = the preset's max_seq_len."""
    lr: float = 2e-3
    """Peak learning rate (AdamW, betas 0.9/0.95 as in Chameleon)."""
    min_lr_ratio: float = 0.05
    """Final LR of the cosine schedule as a fraction of the peak."""
    warmup_steps: int = 60
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; not norms)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    z_loss: float = 1e-5
    """z-loss weight on logsumexp(logits)^2 (Chameleon)."""
    dropout: float | None = None
    """Dropout after attention and MLP; unset = the preset's value."""
    image_token_noise: float | None = None
    """Fraction of the image codes of pictures being drawn (caption first) replaced in the input by a random image
    code; the targets stay the true codes, and pictures being read keep theirs. The model then cannot finish a
    picture by recalling the exact codes it has drawn so far and has to follow the caption. Unset = 0.1 when the run
    would show its image-caption pairs more than 20 times (drawings of new captions then come out as copies of
    training images without it), else 0; a resumed run keeps what it started with."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    checkpoint_every: int = 400
    """Checkpoint every K steps (and always at the end)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep."""
    eval_every: int = 400
    """Validation loss per modality (and a sample sheet) every K steps; 0 = only at the end. The weights with the
    lowest held-out loss (reading + drawing) are kept in LMRUN/checkpoints/best."""
    final: Literal["last", "best"] = "best"
    """The run's model (what sample, eval and --init-from load from LMRUN): best = the weights with the lowest held-out
    loss (LMRUN/checkpoints/best; the last step's when there are no held-out pairs), last = the last step's weights
    whatever the held-out loss did. On a small data set the last weights have often memorised it."""
    resume: bool = False
    """Continue from the newest good checkpoint in --out (exactly: same losses as an uninterrupted run)."""
    max_nonfinite: int = 5
    """Stop after this many non-finite steps in a row (each one is skipped)."""
    compile: bool = False
    """Compile the training step with torch.compile (needs a C++ compiler on CPU): costs a compilation the first
    time (shorter once inductor's on-disk cache has it), then trains faster; the demo turns it on
    (bench/RESULTS.md has the figures)."""
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """auto = bf16 autocast where products in bf16 are fast (a GPU with bf16; a CPU with AMX or AVX512-BF16),
    fp32 elsewhere; weights, optimizer state and losses stay fp32. Use no for bit-exact fp32 runs."""
    log_every: int = 10
    """Print a log line every K steps (the progress bar updates every step)."""

    def __post_init__(self):
        if self.init_from is None:
            if self.vocab is None or self.image_tokenizer is None:
                raise ValueError("--vocab and --image-tokenizer are required (or --init-from RUN, whose vocabulary and "
                                 "image tokenizer are then used)")
            if self.preset is None:
                self.preset = "small"
        if self.final not in ("last", "best"):
            raise ValueError(f"--final {self.final!r} is not one of last, best")
        if self.trainable not in ("all", "image-head"):
            raise ValueError(f"--trainable {self.trainable!r} is not one of all, image-head")
        if self.trainable == "image-head" and self.init_from is None:
            raise ValueError("--trainable image-head trains only the output layer of a trained decoder; give --init-from RUN")
        if self.preset is not None and self.preset not in DECODER_PRESETS:
            raise ValueError(f"--preset {self.preset!r} is not one of {', '.join(DECODER_PRESETS)}")
        for name in ("steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            check_number(name.replace("_", "-"), getattr(self, name), 1)
        check_number("batch-size", self.batch_size, 1, MAX_BATCH)
        if self.micro_batch_size is not None:
            check_number("micro-batch-size", self.micro_batch_size, 1, MAX_BATCH)
        if self.context_len is not None:
            check_number("context-len", self.context_len, MIN_CONTEXT)
        check_number("lr", self.lr, 0)
        if self.lr == 0:
            raise ValueError("--lr must be positive, got 0")
        check_number("min-lr-ratio", self.min_lr_ratio, 0, 1)
        for name in ("warmup_steps", "weight_decay", "grad_clip", "z_loss", "eval_every", "max_nonfinite"):
            check_number(name.replace("_", "-"), getattr(self, name), 0)
        if self.dropout is not None:
            check_number("dropout", self.dropout, 0, 1, hi_open=True)
        if self.image_token_noise is not None:
            check_number("image-token-noise", self.image_token_noise, 0, 1, hi_open=True)
        check_number("seed", self.seed, 0, MAX_SEED)
        for name in ("out", "init_from"):
            check_not_file(name.replace("_", "-"), getattr(self, name))  # the data options are validated by DataConfig


# ---------------------------------------------------------------- schedule and optimizer


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The LR of a step: linear warmup, then cosine decay to min_lr_ratio·lr."""
    return warmup_cosine_lr(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the parameters that train; weight decay on matrices only, and none under --trainable image-head
    (the frozen rows of the output layer must not decay)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "norm" not in name and cfg.trainable == "all" else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    # fused: one kernel for the whole update (CPU and CUDA have it), a few % of a small model's step
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


# ---------------------------------------------------------------- run directory


def _check_same(src: Path, dest: Path, what: str, fix: str, files: tuple[str, ...] = ("layout.json", "config.json")) -> None:
    """UserError unless the vocabulary / image tokenizer directory ``src`` describes the same one as ``dest``."""
    for fname in files:
        if (src / fname).is_file() and load_json(src / fname) != load_json(dest / fname):
            raise UserError(f"{dest / fname} differs from {src / fname}: {what}; {fix}")


def _prepare_run_dir(cfg: TrainConfig, vocab_dir: Path, vq_dir: Path) -> None:
    """Copy the vocabulary and image tokenizer into LMRUN (or check they match on --resume)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for src, name in ((vocab_dir, VOCAB_DIR), (vq_dir, IMAGE_TOKENIZER_DIR)):
        dest = out / name
        if dest.is_dir():
            kind = "vocabulary" if name == VOCAB_DIR else "image tokenizer"
            _check_same(src, dest, f"{out} was trained with another {kind}", "use a new --out")
        else:
            copy_dir(src, dest)


def _init_source(cfg: TrainConfig) -> tuple[Path | None, Path, Path]:
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
        _check_same(vocab_dir, root / VOCAB_DIR, f"--vocab is not the vocabulary of --init-from {root}",
                    "leave --vocab out to use the run's own", files=("layout.json", "tokenizer.json"))
    return ckpt, vocab_dir, Path(cfg.image_tokenizer) if cfg.image_tokenizer else root / IMAGE_TOKENIZER_DIR


def decoder_config(cfg: TrainConfig, vocab: Vocabulary, init: Path | None) -> DecoderConfig:
    """The decoder's shape: the preset's, or the --init-from checkpoint's (which an explicit --preset must match);
    --dropout overrides either."""
    overrides = {} if cfg.dropout is None else {"dropout": cfg.dropout}
    if init is None:
        return DecoderConfig.from_preset(cfg.preset, vocab.vocab_size, **overrides)
    saved = DecoderConfig.from_dict(load_json(init / CONFIG)["decoder"])
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
    """--trainable image-head: only the output layer trains (its image-id columns, see ``mask_to_image_head``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.output.weight.requires_grad_(True)


def mask_to_image_head(model: Decoder, image_ids: range) -> None:
    """Zero the output layer's gradient outside the image-id columns (the weight is stored (dim, vocab_size)), so
    that AdamW (no weight decay here) leaves every other row exactly as it was."""
    grad = model.output.weight.grad
    if grad is not None:
        grad[:, :image_ids.start] = 0
        grad[:, image_ids.stop:] = 0


def data_identity(data: DataConfig) -> dict:
    """What of the data options shapes the batch stream (sources with their paths made absolute)."""
    ident = {k: v for k, v in asdict(data).items() if k not in ("strict", "cache_dir")}
    ident["sources"] = [source_key(s) for s in data.sources]
    return ident


# ---------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from earlyfusion.training.monitor import loss_curves_png, sample_sheet, tensorboard_writer, validation_losses

    init, vocab_dir, vq_dir = _init_source(cfg)
    vocab = Vocabulary.load(vocab_dir)
    check_vocab_matches(vocab, vq_dir, f"--vocab {vocab_dir} vs --image-tokenizer {vq_dir}")
    dcfg = decoder_config(cfg, vocab, init)
    if cfg.trainable == "image-head" and dcfg.tie_embeddings:
        raise UserError("--trainable image-head needs a separate output layer, but this decoder ties it to the token "
                        "embedding; use --trainable all")

    context_len = cfg.context_len or dcfg.max_seq_len
    if context_len > dcfg.max_seq_len:
        raise UserError(f"--context-len {context_len} exceeds the decoder's max_seq_len {dcfg.max_seq_len}")

    def too_short(need: int, what: str) -> UserError:
        return UserError(context_error(context_len=context_len, given=cfg.context_len is not None,
                                       max_seq_len=dcfg.max_seq_len, preset=cfg.preset, need=need, what=what))

    if context_len < pair_overhead(vocab):
        raise too_short(pair_overhead(vocab), f"one image (<s> {span_words(vocab)} </s>)")
    mp, why = mixed_precision(cfg.mixed_precision)
    accelerator = Accelerator(mixed_precision="no")  # autocast is ours: one choice, logged, per command
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process

    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    per_proc = cfg.batch_size // world
    micro = cfg.micro_batch_size or per_proc
    if per_proc % micro:
        raise UserError(f"per-process batch {per_proc} must be divisible by --micro-batch-size {micro}")
    out = Path(cfg.out)
    loop = TrainLoop(out=out, checkpoints=out / CHECKPOINTS_DIR, steps=cfg.steps, checkpoint_every=cfg.checkpoint_every,
                     keep_checkpoints=cfg.keep_checkpoints, log_every=cfg.log_every, max_nonfinite=cfg.max_nonfinite,
                     main=main, desc="train")
    ckpt = loop.resume_point(cfg.resume)
    saved = load_json(ckpt / "config.json") if ckpt is not None else None
    recorded = (saved or {}).get("identity")  # a resumed run keeps what the unset options were sized to
    cfg.data = cfg.data.sized_as((recorded or {}).get("data") or {})
    if cfg.image_token_noise is None and recorded is not None:
        cfg.image_token_noise = recorded.get("image_token_noise", 0.0)  # none in checkpoints from before the option

    def run_identity() -> dict:
        """The options a resumed run must share (recorded in every checkpoint)."""
        identity = {"preset": cfg.preset, "decoder": dcfg.to_dict(), "data": data_identity(cfg.data), "seed": cfg.seed,
                    "batch_size": cfg.batch_size, "context_len": context_len, "trainable": cfg.trainable,
                    "image_token_noise": cfg.image_token_noise, "init_from": None if init is None else str(init.resolve()),
                    "init_weights": None if init is None else weights_fingerprint(init)}
        if init is not None:
            del identity["preset"]  # the shape is the run's: "decoder" records it, given with --preset or not
        return identity

    def check_resume() -> None:
        """Refuse a checkpoint of a run with other options (before any data is read where the options are known)."""
        if ckpt is not None:
            check_identity(saved.get("identity") or {"decoder": saved["decoder"]}, run_identity(), ckpt)

    def batch_stream() -> PackedBatches:
        try:
            return training_batches(cfg.data, vocab=vocab, image_tokenizer=vq_dir, context_len=context_len,
                                    batch_size=cfg.batch_size, seed=cfg.seed, fit_captions=True)
        except ContextTooShort as e:
            raise too_short(e.need, f"one image with the longest caption ({e.where}: {e.caption_tokens} tokens; "
                                    f"<s> {e.image} caption </s>)") from None

    size_views, size_noise = cfg.data.augment_views is None, cfg.image_token_noise is None
    if not (size_views or size_noise):
        check_resume()
    batches = batch_stream()  # unset --augment-views: no augmentation while the passes are counted
    if size_views or size_noise:  # regularised when the pairs would be seen too often
        passes = pair_passes(batches.data, vocab, steps=cfg.steps, batch_size=cfg.batch_size, context_len=context_len)
        repeats, added = repeats_too_often(passes), {}  # the option that turns it off -> what was added
        if size_views:
            cfg.data = cfg.data.sized(repeats)
            if cfg.data.augment_views > 1:
                swap = ", ".join(f"{a}/{b}" for a, b in cfg.data.augment(cfg.seed).swap)
                words = f"captions with {swap} exchanged where they occur" if swap else "captions unchanged"
                added["--augment-views 1"] = f"each image is shown as itself and as its mirror image, {words}"
                batches = batch_stream()
        if size_noise:
            cfg.image_token_noise = SIZED_IMAGE_TOKEN_NOISE if repeats else 0.0
            if repeats:
                added["--image-token-noise 0"] = (f"{100 * SIZED_IMAGE_TOKEN_NOISE:.0f}% of the codes of each picture "
                                                  "being drawn are replaced by random codes in its input")
        if added:
            log.info("the image-caption pairs would be seen about %.0f times: %s", passes,
                     ", and ".join(f"{what} ({flag} turns it off)" for flag, what in added.items()))
        check_resume()
    identity = run_identity()
    if main:
        say_epochs(batches.data, vocab, steps=cfg.steps, batch_size=cfg.batch_size, context_len=context_len)
    # validated on each data directory's validation split when it has one (a photos set's val), else its test split
    heldout = heldout_pairs(cfg.data.sources, vocab=vocab, image_tokenizer=vq_dir, cache_dir=cfg.data.cache_dir, split=None)
    if not heldout:
        log.info("no held-out pairs: validation skipped")
    elif main:
        log.info("validation: %d held-out pairs (%s)", len(heldout),
                 ", ".join(sorted({str(Path(p.path).parent) for p in heldout}))[:200])
    # built before the seed is set: building a module draws from the RNG that dropout uses after it
    vq = load_vq(vq_dir) if heldout and main else None

    if main:
        _prepare_run_dir(cfg, vocab_dir, vq_dir)
    accelerator.wait_for_everyone()

    set_seed(cfg.seed)
    model = Decoder(dcfg)  # fp32 master weights, whatever dtype the --init-from file holds
    if init is not None and ckpt is None:
        load_weights(init / WEIGHTS, model)
        log.info("initialised from %s", init)
    image_ids = vocab.image_range if cfg.trainable == "image-head" else None
    if image_ids is not None:
        freeze_to_image_head(model)
    optimizer = make_optimizer(model, cfg)

    # the held-out pairs as the best model's scores depend on them: their splits and how many (not paths: data may move)
    best = BestModel(out, main, heldout=sorted({Path(p.path).parent.name for p in heldout}) + [len(heldout)]
                     if heldout else None)
    if ckpt is not None:
        load_weights(ckpt / "model.safetensors", model)
        state = load_state(ckpt, "state")
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        best.load_state_dict(state.get("best"))
        if state.get("precision", mp) != mp:  # this command's choice wins: the machine may differ
            log.warning("steps up to %d ran with --mixed-precision %s and the rest run with %s: the losses will not be "
                        "those of one uninterrupted run", state["step"], state["precision"], mp)
        if rank != 0:
            torch.manual_seed(cfg.seed + 1000003 * rank + state["step"])
        loop.restore(state)
        log.info("resumed from %s (step %d)", ckpt, loop.start_step)

    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    losses_of = TokenLosses(model)
    forward = compiled(losses_of, dynamic=False) if cfg.compile else losses_of  # packed rows: always the same shape
    # a resumed run keeps the kernel it started with (the two kernels round differently)
    attention = attention_plan(raw_model, micro, context_len, precision=mp, packed=True, compile=cfg.compile,
                               kernel=state.get("attention") if ckpt is not None else None)
    writer = tensorboard_writer(out) if main else None

    def save_checkpoint(step: int) -> None:
        state = {"optimizer": optimizer.state_dict(), "data": batches.state_dict(), "rng": torch.get_rng_state(),
                 "best": best.state_dict(), "attention": attention.kernel, "precision": mp, **loop.counters(step)}
        if main:
            def write(tmp: Path) -> None:
                write_decoder(tmp, raw_model, run_config(step))
                save_state(tmp, "state", state)

            loop.save(step, write)
        accelerator.wait_for_everyone()

    grids = {IMAGE_GRIDS: [list(g) for g in batches.data.grids]} if vocab.grid_tokens else {}

    def run_config(step: int, **extra) -> dict:
        return {"decoder": dcfg.to_dict(), "train": asdict(cfg), "step": step, "context_len": context_len,
                "identity": identity, **grids, **extra}

    n_params = sum(p.numel() for p in raw_model.parameters())
    log.info("decoder %s: %.2fM parameters, context %d, vocab %d, %d process(es), %s",
             cfg.preset or f"of {init}", n_params / 1e6, context_len, vocab.vocab_size, world, mp)
    log.info(f"precision: {why}")  # after every check that can refuse the run: an error stays one line
    log.info("attention: %s", attention.describe())
    if image_ids is None:
        log.info("training all %d parameters", n_params)
    else:
        log.info("training %d of %d parameters: the output layer's columns of the %d image ids",
                 dcfg.dim * len(image_ids), n_params, len(image_ids))

    t_last = time.perf_counter()
    for step in loop.iterate():
        model.train()
        lr = loop.set_lr(optimizer, lr_at(step, cfg))
        batch = next(batches)  # the global batch, identical on every process
        if cfg.image_token_noise:
            noisy = noisy_image_codes(batch["tokens"], batch["targets"], vocab.image_range, cfg.image_token_noise,
                                      seed=cfg.seed, step=step)
            batch = dict(batch, tokens=noisy)
        n_global = max(int((batch["targets"] != -100).sum()), 1)
        rows = slice(rank * per_proc, (rank + 1) * per_proc)
        local = {k: v[rows] for k, v in batch.items()}
        totals = dict.fromkeys(("sum_text", "n_text", "sum_image", "n_image", "sum_all", "sum_z", "n_all"), 0.0)
        out_norm = 0.0
        for i in range(0, per_proc, micro):
            mb = {k: v[i:i + micro].to(accelerator.device) for k, v in local.items()}
            last = i + micro >= per_proc
            with (accelerator.no_sync(model) if not last and world > 1 else contextlib.nullcontext()):
                with autocast(mp, accelerator.device.type):
                    losses = forward(mb["tokens"], mb["targets"], positions=mb["positions"], doc_ids=mb["doc_ids"])
                # grads are averaged over processes, so scale the global-token mean by world size
                loss, stats = lm_loss(losses, mb["targets"], mb["modality"], cfg.z_loss, denom=n_global / world)
                accelerator.backward(loss)
            out_norm = max(out_norm, stats["out_norm"])
            for k in totals:
                totals[k] += stats[k]
        if world > 1:
            t = torch.tensor([totals[k] for k in totals], dtype=torch.float64, device=accelerator.device)
            t = accelerator.reduce(t, reduction="sum")
            totals = dict(zip(totals, t.tolist()))
        if image_ids is not None:
            mask_to_image_head(raw_model, image_ids)
        gnorm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        gnorm = float(gnorm)
        loss_val = (totals["sum_all"] + cfg.z_loss * totals["sum_z"]) / max(totals["n_all"], 1)
        done = step + 1
        skipped = loop.skip_nonfinite(step, loss_val, gnorm)
        if skipped:
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            now = time.perf_counter()
            record = {
                "step": done, "loss": loss_val,
                "loss_text": totals["sum_text"] / totals["n_text"] if totals["n_text"] else None,
                "loss_image": totals["sum_image"] / totals["n_image"] if totals["n_image"] else None,
                "z_loss": totals["sum_z"] / max(totals["n_all"], 1), "grad_norm": gnorm, "out_norm": out_norm,
                "lr": lr, "tokens_per_s": float(batch["tokens"].numel()) / max(now - t_last, 1e-9),
                "skipped_nonfinite": loop.skipped,
            }
            t_last = now
            if heldout and (cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.steps):
                raw_model.eval()
                if main:
                    val = validation_losses(raw_model, vocab, heldout, device=accelerator.device)
                    record.update({f"val_{k}": v for k, v in val.items()}, val_loss=heldout_score(val))
                    turned_up = best.observe(done, val, lambda tmp: write_decoder(tmp, raw_model, run_config(done, heldout=val)))
                    if turned_up:
                        log.warning("%s", turned_up)
                    sample_sheet(raw_model, vocab, vq, heldout, out / "samples" / f"step-{done:08d}.png", seed=cfg.seed)
                accelerator.wait_for_everyone()
            line = (f"step {done}/{cfg.steps} loss {loss_val:.4f} text {_fmt(record['loss_text'])} "
                    f"image {_fmt(record['loss_image'])} gnorm {gnorm:.2f} lr {lr:.2e} {record['tokens_per_s']:.0f} tok/s")
            if "val_loss_text" in record:
                line += f" | val text {_fmt(record['val_loss_text'])} image {_fmt(record['val_loss_image'])}"
            loop.record(record, {"loss": f"{loss_val:.3f}", "txt": _fmt(record["loss_text"]), "img": _fmt(record["loss_image"]),
                                 "tok_s": f"{record['tokens_per_s']:.0f}"}, line, force="val_loss_text" in record)
            if writer is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "step":
                        writer.add_scalar(k, v, done)
        if loop.checkpoint_due(done, skipped):
            save_checkpoint(done)
    loop.close()
    if main:
        loss_curves_png(loop.metrics_path, out / "loss_curves.png")
        _finish(out, cfg.final, best)
    if writer is not None:
        writer.close()
    accelerator.end_training()
    return out


_VQ_CACHE: dict[str, object] = {}


def load_vq(vq_dir: Path):
    from earlyfusion.tokenizer.vqvae import load_vqvae

    key = str(vq_dir)
    if key not in _VQ_CACHE:
        _VQ_CACHE[key] = load_vqvae(vq_dir).eval()
    return _VQ_CACHE[key]


def weights_fingerprint(ckpt: Path) -> str:
    """sha256 of a checkpoint's weights file, as its manifest records it (the directory was verified on load)."""
    recorded = load_json(ckpt / MANIFEST).get("files", {}).get(WEIGHTS, {}).get("sha256")
    return recorded or sha256_file(ckpt / WEIGHTS)


def _finish(out: Path, final: str, best: BestModel) -> None:
    """Mark the run's model (``--final``) and say which it is."""
    last = latest_good(out / CHECKPOINTS_DIR)
    if final == "best" and best.step is not None:
        set_final(out, BEST_DIR)
        if best.saved_step() != best.step:  # only after a resume with another --eval-every
            log.warning("%s holds the weights of step %s, not those of step %d that this run scored best", best.dir,
                        best.saved_step(), best.step)
        log.info("finished: %s (its model: %s, step %d, lowest held-out loss %.3f; last checkpoint %s)", out,
                 best.dir, best.step, best.score, last)
        return
    set_final(out, None)
    if final == "best":
        log.info("no held-out loss was measured (no held-out pairs): the run's model is the last step's")
    log.info("finished: %s (checkpoint %s)", out, last)
    if best.step is not None and last is not None and best.step != int(last.name.rpartition("-")[2]):
        log.info("lowest held-out loss %.3f was at step %d: %s (--final best makes it the run's model)", best.score,
                 best.step, best.dir)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def train_cmd(cfg: TrainConfig) -> int:
    use_all_cores()
    train(cfg)
    return 0
