"""Training the unified decoder: ``earlyfusion train``.

One accelerate loop for one CPU and for ``accelerate launch`` on many processes, on the shared
``training.trainer.Trainer``. Every optimizer step consumes one *global* batch from
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
grid-token vocabulary each checkpoint's config.json lists the code grids trained on (``runs.trained_grids``).

Non-finite guard: a step whose loss or gradient norm is not finite is skipped (no update) and
counted; more than ``max_nonfinite`` in a row stops the run, leaving the last good checkpoint. The
last step is always checkpointed, skipped or not.

``--init-from RUN`` starts from another run's decoder weights (ours, or an imported Chameleon/Anole
run) with that run's shape, vocabulary and image tokenizer; ``--trainable image-head`` then trains only
the output-layer rows of the image ids and leaves every other weight exactly as it was.

``--sharding fsdp`` shards the decoder over the processes (``training.sharding``): built and restored whole, then
sharded before its optimizer is made; held-out loss is then computed by every process together (a sharded
model's forward passes need them all) and no sample sheets are drawn.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.utils import set_seed

from earlyfusion.core.checkpoint import load_json, read_weights, weights_fingerprint
from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log
from earlyfusion.core.rundir import (
    ADAPTERS,
    CHECKPOINTS_DIR,
    CONFIG,
    IMAGE_GRIDS,
    IMAGE_TOKENIZER_DIR,
    LORA,
    LOSS_CURVES,
    QUESTION_FIRST,
    SAMPLES_DIR,
    VOCAB_DIR,
    WEIGHTS,
    prepare_run_dir,
    write_adapters,
    write_decoder,
)
from earlyfusion.core.runtime import use_all_cores
from earlyfusion.model.attention_plan import attention_plan
from earlyfusion.model.compile import compiled
from earlyfusion.model.decoder import Decoder
from earlyfusion.model.lora import adapter_state, add_adapters, load_adapters
from earlyfusion.model.upgrade import upgrade_optimizer_state
from earlyfusion.tokenizer.vq_checkpoint import load_vqvae
from earlyfusion.training.best import BestModel, finish_run, heldout_score
from earlyfusion.training.data import (
    ContextTooShort,
    DataConfig,
    PackedBatches,
    check_heldout_split,
    heldout_pairs,
    is_code_dir,
    noisy_image_codes,
    parse_source,
    training_batches,
    validation_split,
)
from earlyfusion.training.data.runs import load_decoder_weights
from earlyfusion.training.lm_config import TrainConfig
from earlyfusion.training.lm_inputs import Inputs, freeze_to_image_head, mask_to_image_head, read_inputs, too_short
from earlyfusion.training.lm_loss import TokenLosses, lm_loss
from earlyfusion.training.memory import memory_line, planned_bytes
from earlyfusion.training.monitor import loss_curves_png, sample_sheet, tensorboard_writer, validation_losses
from earlyfusion.training.sharding import zero_grad_rows_outside
from earlyfusion.training.sizing import pair_passes, say_epochs, sized_options
from earlyfusion.training.trainer import Trainer, check_identity, source_key, warmup_cosine_lr

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


def data_identity(data: DataConfig) -> dict:
    """What of the data options shapes the batch stream (sources with their paths made absolute)."""
    ident = {k: v for k, v in asdict(data).items() if k not in ("strict", "cache_dir", "loader_workers")}
    ident["reading_ratio"] = data.reading  # the share in force (a run from before it could be sized recorded it so)
    ident["sources"] = [source_key(s) for s in data.sources]
    return ident


# ---------------------------------------------------------------- the run, phase by phase


def run_identity(cfg: TrainConfig, inputs: Inputs) -> dict:
    """The options a resumed run must share (recorded in every checkpoint)."""
    init = inputs.init
    identity = {"preset": cfg.preset, "decoder": inputs.decoder.to_dict(), "data": data_identity(cfg.data),
                "seed": cfg.seed, "batch_size": cfg.batch_size, "context_len": inputs.context_len,
                "trainable": cfg.trainable, "image_token_noise": cfg.image_token_noise,
                "init_from": None if init is None else str(init.resolve()),
                "init_weights": None if init is None else weights_fingerprint(init, WEIGHTS)}
    if init is not None:
        del identity["preset"]  # the shape is the run's: "decoder" records it, given with --preset or not
    return identity


def open_batches(cfg: TrainConfig, inputs: Inputs, ckpt: Path | None) -> tuple[PackedBatches, dict]:
    """The batch stream and the run's identity, the options left unset sized to the data (``sizing.sized_options``;
    a resumed run keeps what it was sized to), and a resumed run's recorded identity checked before the data is read
    where the options allow."""
    saved = load_json(ckpt / CONFIG) if ckpt is not None else None
    recorded = (saved or {}).get("identity")
    cfg.data = cfg.data.sized_as((recorded or {}).get("data") or {})
    if cfg.image_token_noise is None and recorded is not None:
        cfg.image_token_noise = recorded.get("image_token_noise", 0.0)  # none in checkpoints from before the option

    def check_resume() -> None:
        if saved is not None:
            check_identity(recorded or {"decoder": saved["decoder"]}, run_identity(cfg, inputs), ckpt)

    def stream() -> PackedBatches:
        try:
            return training_batches(cfg.data, vocab=inputs.vocab, image_tokenizer=inputs.vq_dir,
                                    context_len=inputs.context_len, batch_size=cfg.batch_size, seed=cfg.seed,
                                    fit_captions=True)
        except ContextTooShort as e:
            raise too_short(cfg, inputs, e.need, f"one image with the longest caption ({e.where}: {e.caption_tokens} "
                                                 f"tokens; <s> {e.image} caption </s>)") from None

    sizing = cfg.data.augment_views is None or cfg.image_token_noise is None or cfg.data.reading_ratio is None
    if not sizing:
        check_resume()
    batches = stream()  # unset --augment-views: no augmentation while the passes are counted
    if sizing:
        passes = pair_passes(batches.data, inputs.vocab, steps=cfg.steps, batch_size=cfg.batch_size,
                             context_len=inputs.context_len)
        data, noise = sized_options(cfg.data, cfg.image_token_noise, passes, cfg.seed)
        if data != cfg.data:
            cfg.data = data
            batches = stream()
        cfg.image_token_noise = noise
        check_resume()
    return batches, run_identity(cfg, inputs)


def validation_split_of(cfg: TrainConfig) -> str | None:
    """The split to validate on (None: each directory's own, ``validation_split``); a UserError when that is the split
    the run trains on and --val-split did not name it: the best model would be chosen on training data."""
    if cfg.val_split is not None:
        for spec in cfg.data.sources:
            path = Path(parse_source(spec)[0]).expanduser()
            if path.is_dir():
                check_heldout_split(path, cfg.val_split)  # a split that is not there is an error, never no validation
        if cfg.val_split == cfg.data.split:
            log.warning("--val-split %s is the training split: the best model is chosen on training data", cfg.val_split)
        return cfg.val_split
    for spec in cfg.data.sources:
        path = Path(parse_source(spec)[0]).expanduser()
        if path.is_dir() and validation_split(path) == cfg.data.split:
            raise UserError(f"--split {cfg.data.split} is also the split {path} validates on, so the best model would be "
                            f"chosen on training data; choose another with --val-split NAME (or --val-split "
                            f"{cfg.data.split} to do it anyway)")
    return None


def build_model(cfg: TrainConfig, inputs: Inputs, trainer: Trainer):
    """(decoder, optimizer, the training state of the resumed checkpoint or None): fp32 master weights, initialised
    from --init-from, frozen to the image head with --trainable image-head, restored on --resume, sharded under
    --sharding fsdp."""
    set_seed(cfg.seed)
    model = Decoder(inputs.decoder)  # fp32 master weights, whatever dtype the --init-from file holds
    lora = cfg.lora()
    if inputs.init is not None and (trainer.ckpt is None or lora is not None):  # a LoRA run's base: always the init's
        load_decoder_weights(inputs.init, model)  # converts a checkpoint of the earlier (in, out) layout
        log.info("initialised from %s", inputs.init)
    if cfg.trainable == "image-head":
        freeze_to_image_head(model)
    if lora is not None:
        add_adapters(model, lora)
    saved = load_json(trainer.ckpt / CONFIG) if trainer.ckpt is not None else None
    if saved is not None and lora is not None:
        load_adapters(model, read_weights(trainer.ckpt / ADAPTERS))
    elif saved is not None:  # whole weights load before sharding (a sharded run's too)
        load_decoder_weights(trainer.ckpt, model, saved)
    model = trainer.shard(model)
    optimizer = make_optimizer(model, cfg)  # over the shards when sharded
    log.info(memory_line(planned_bytes(model), trainer.world, trainer.sharded))
    state = None
    if trainer.ckpt is not None:
        state = trainer.load_state()
        # AdamW's moments follow their weights' layout (a checkpoint of the earlier layout has them transposed)
        if "optimizer" in state:  # not in a sharded checkpoint: its shards were written in the current layout
            state["optimizer"] = upgrade_optimizer_state(state["optimizer"], optimizer, model, saved["decoder"])
        if state.get("precision", trainer.mp) != trainer.mp:  # this command's choice wins: the machine may differ
            log.warning("steps up to %d ran with --mixed-precision %s and the rest run with %s: the losses will not be "
                        "those of one uninterrupted run", state["step"], state["precision"], trainer.mp)
        trainer.restore(state, optimizer, model)
        if trainer.rank != 0:
            torch.manual_seed(cfg.seed + 1000003 * trainer.rank + state["step"])
    return model, optimizer, state


def train(cfg: TrainConfig) -> Path:
    """Train the decoder into ``cfg.out`` (resuming it with ``--resume``); returns the run directory."""
    inputs = read_inputs(cfg)
    val_split = validation_split_of(cfg)
    out = Path(cfg.out)
    trainer = Trainer(out=out, checkpoints=out / CHECKPOINTS_DIR, steps=cfg.steps, checkpoint_every=cfg.checkpoint_every,
                      keep_checkpoints=cfg.keep_checkpoints, log_every=cfg.log_every, max_nonfinite=cfg.max_nonfinite,
                      grad_clip=cfg.grad_clip, batch_size=cfg.batch_size, precision=cfg.mixed_precision,
                      resume=cfg.resume, desc="train", sharding=cfg.sharding)
    if trainer.sharding == "fsdp" and cfg.compile:  # the compiled step cannot trace FSDP's gathering of the weights
        raise UserError("--compile does not work with --sharding fsdp (or accelerate's FSDP config); drop one of them")
    if trainer.sharding == "fsdp" and cfg.trainable == "lora":  # adapters are written from unsharded modules
        raise UserError("--trainable lora does not work with --sharding fsdp (or accelerate's FSDP config) yet; "
                        "train the adapters with --sharding none")
    per_proc = cfg.batch_size // trainer.world
    micro = cfg.micro_batch_size or per_proc
    if per_proc % micro:
        raise UserError(f"per-process batch {per_proc} must be divisible by --micro-batch-size {micro}")
    with trainer:
        _train(cfg, inputs, trainer, micro, val_split)
    return out


def _train(cfg: TrainConfig, inputs: Inputs, trainer: Trainer, micro: int, val_split: str | None) -> None:
    out, main, vocab = trainer.out, trainer.main, inputs.vocab

    # ---- data: the batch stream, sized to the data, and the held-out pairs
    batches, identity = open_batches(cfg, inputs, trainer.ckpt)
    if main:
        say_epochs(batches.data, vocab, steps=cfg.steps, batch_size=cfg.batch_size, context_len=inputs.context_len)
    # validated on each data directory's validation split when it has one (a photos set's val), else its test split
    heldout = heldout_pairs(cfg.data.sources, vocab=vocab, image_tokenizer=inputs.vq_dir, cache_dir=cfg.data.cache_dir,
                            split=val_split)
    if not heldout:
        log.info("no held-out pairs: validation skipped (a code-shard directory CODES validates on its CODES/val or "
                 "CODES/test, made by `earlyfusion encode --split val --out CODES/val`)"
                 if any(is_code_dir(Path(parse_source(s)[0]).expanduser()) for s in cfg.data.sources) else
                 "no held-out pairs: validation skipped")
    elif main:
        log.info("validation: %d held-out pairs (%s)", len(heldout),
                 ", ".join(sorted({str(Path(p.path).parent) for p in heldout}))[:200])
    # built before the seed is set: building a module draws from the RNG that dropout uses after it
    vq = load_vqvae(inputs.vq_dir).eval() if heldout and main else None
    if main:
        prepare_run_dir(out, {VOCAB_DIR: inputs.vocab_dir, IMAGE_TOKENIZER_DIR: inputs.vq_dir})
    trainer.accelerator.wait_for_everyone()

    # ---- the model, restored on --resume, and how its steps run
    model, optimizer, state = build_model(cfg, inputs, trainer)
    # the held-out pairs as the best model's scores depend on them: their splits and how many (not paths: data may move)
    best = BestModel(out, main, heldout=sorted({Path(p.path).parent.name for p in heldout}) + [len(heldout)]
                     if heldout else None)
    if state is not None:
        batches.load_state_dict(state["data"])
        best.load_state_dict(state.get("best"))
    model, optimizer = trainer.prepare(model, optimizer)
    raw_model = trainer.unwrap(model)
    losses_of = TokenLosses(model)
    forward = compiled(losses_of, dynamic=False) if cfg.compile else losses_of  # packed rows: always the same shape
    # a resumed run keeps the kernel it started with (the two kernels round differently)
    attention = attention_plan(raw_model, micro, inputs.context_len, precision=trainer.mp, packed=True,
                               compile=cfg.compile, kernel=state.get("attention") if state is not None else None)
    writer = tensorboard_writer(out) if main else None
    # what sampling needs to know of the data: the grids it may draw, the order its questions are written in
    of_data = {IMAGE_GRIDS: [list(g) for g in batches.data.grids]} if vocab.grid_tokens else {}
    question_first = getattr(batches.data, "question_first", None)  # streamed data holds no conversations
    if question_first is None and inputs.init is not None:  # data without conversations: the base run's order holds
        question_first = load_json(inputs.init / CONFIG).get(QUESTION_FIRST)
    if question_first is not None:
        of_data[QUESTION_FIRST] = question_first

    lora = cfg.lora()
    adapts = {} if lora is None else {LORA: {**lora.to_dict(), "base": str(inputs.init.resolve()),
                                             "base_weights": weights_fingerprint(inputs.init, WEIGHTS)}}

    def run_config(step: int, **extra) -> dict:
        return {"decoder": inputs.decoder.to_dict(), "train": asdict(cfg), "step": step,
                "context_len": inputs.context_len, "identity": identity, **of_data, **adapts, **extra}

    def write_weights(tmp: Path, weights, config: dict) -> None:
        """A LoRA run writes its adapters alone (its config names the base); any other run its whole weights."""
        if lora is not None:
            write_adapters(tmp, adapter_state(raw_model), config)
        else:
            write_decoder(tmp, weights, config)

    def save_checkpoint(step: int) -> None:
        weights = trainer.weights(raw_model)  # a sharded model's, gathered by every process
        trainer.save(step, optimizer, lambda tmp: write_weights(tmp, weights, run_config(step)),
                     {"data": batches.state_dict(), "best": best.state_dict(), "attention": attention.kernel,
                      "precision": trainer.mp}, model=raw_model)

    image_ids = vocab.image_range if cfg.trainable == "image-head" else None
    n_params = sum(p.numel() for p in raw_model.parameters())
    log.info("decoder %s: %.2fM parameters, context %d, vocab %d, %d process(es), %s", cfg.preset or f"of {inputs.init}",
             n_params / 1e6, inputs.context_len, vocab.vocab_size, trainer.world, trainer.mp)
    log.info(f"precision: {trainer.precision_why}")  # after every check that can refuse the run: an error stays one line
    log.info("attention: %s", attention.describe())
    if trainer.sharded and heldout:
        log.info("--sharding fsdp: no sample sheets during training (`earlyfusion sample` draws from a checkpoint)")
    if image_ids is None:
        log.info("training all %d parameters", n_params)
    else:
        log.info("training %d of %d parameters: the output layer's rows of the %d image ids",
                 inputs.decoder.dim * len(image_ids), n_params, len(image_ids))

    # ---- the steps
    t_last = time.perf_counter()
    for step in trainer.iterate():
        model.train()
        lr = trainer.set_lr(optimizer, lr_at(step, cfg))
        batch = next(batches)  # the global batch, identical on every process
        if cfg.image_token_noise:
            noisy = noisy_image_codes(batch["tokens"], batch["targets"], vocab.image_range, cfg.image_token_noise,
                                      seed=cfg.seed, step=step)
            batch = dict(batch, tokens=noisy)
        totals, out_norm = accumulate_gradients(trainer, model, forward, batch, micro, cfg.z_loss)
        if image_ids is not None and trainer.sharded:
            zero_grad_rows_outside(raw_model.output.weight, image_ids)
        elif image_ids is not None:
            mask_to_image_head(raw_model, image_ids)
        gnorm = trainer.clip(model.parameters())
        loss_val = (totals["sum_all"] + cfg.z_loss * totals["sum_z"]) / max(totals["n_all"], 1)
        done = step + 1
        skipped = trainer.update(optimizer, step, loss_val, gnorm)
        if not skipped:
            now = time.perf_counter()
            record = {
                "step": done, "loss": loss_val,
                "loss_text": totals["sum_text"] / totals["n_text"] if totals["n_text"] else None,
                "loss_image": totals["sum_image"] / totals["n_image"] if totals["n_image"] else None,
                "z_loss": totals["sum_z"] / max(totals["n_all"], 1), "grad_norm": gnorm, "out_norm": out_norm,
                "lr": lr, "tokens_per_s": float(batch["tokens"].numel()) / max(now - t_last, 1e-9),
                "skipped_nonfinite": trainer.skipped,
            }
            t_last = now
            if heldout and (cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.steps):
                raw_model.eval()
                if main or trainer.sharded:  # a sharded model's forward passes need every process
                    val = trainer.same(validation_losses(raw_model, vocab, heldout, device=trainer.device))
                    score = heldout_score(val)
                    weights = trainer.weights(raw_model) if math.isfinite(score) and score < best.score else raw_model
                    turned_up = best.observe(done, val, lambda tmp: write_weights(tmp, weights, run_config(done, heldout=val)))
                if main:
                    record.update({f"val_{k}": v for k, v in val.items()}, val_loss=score)
                    if turned_up:
                        log.warning("%s", turned_up)
                    if not trainer.sharded:
                        sample_sheet(raw_model, vocab, vq, heldout, out / SAMPLES_DIR / f"step-{done:08d}.png",
                                     seed=cfg.seed)
                trainer.accelerator.wait_for_everyone()
            line = (f"step {done}/{cfg.steps} loss {loss_val:.4f} text {_fmt(record['loss_text'])} "
                    f"image {_fmt(record['loss_image'])} gnorm {gnorm:.2f} lr {lr:.2e} {record['tokens_per_s']:.0f} tok/s")
            if "val_loss_text" in record:
                line += f" | val text {_fmt(record['val_loss_text'])} image {_fmt(record['val_loss_image'])}"
            trainer.record(record, {"loss": f"{loss_val:.3f}", "txt": _fmt(record["loss_text"]),
                                    "img": _fmt(record["loss_image"]), "tok_s": f"{record['tokens_per_s']:.0f}"},
                           line, force="val_loss_text" in record)
            if writer is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "step":
                        writer.add_scalar(k, v, done)
        if trainer.checkpoint_due(done, skipped):
            save_checkpoint(done)
    if writer is not None:
        writer.close()
    trainer.close()

    # ---- after the last step: the run's model
    if main:
        loss_curves_png(trainer.metrics_path, out / LOSS_CURVES)
        finish_run(out, cfg.final, best)


def accumulate_gradients(trainer: Trainer, model, forward, batch: dict, micro: int, z_loss: float) -> tuple[dict, float]:
    """Forward and backward this process's rows of the global batch in micro-batches of ``micro`` rows (gradients
    synchronised at the last one); returns the loss sums over all processes and the largest output norm."""
    world, rank = trainer.world, trainer.rank
    per_proc = batch["tokens"].shape[0] // world
    n_global = max(int((batch["targets"] != -100).sum()), 1)
    local = {k: v[rank * per_proc:(rank + 1) * per_proc] for k, v in batch.items()}
    totals = dict.fromkeys(("sum_text", "n_text", "sum_image", "n_image", "sum_all", "sum_z", "n_all"), 0.0)
    out_norm = 0.0
    for i in range(0, per_proc, micro):
        mb = {k: v[i:i + micro].to(trainer.device) for k, v in local.items()}
        last = i + micro >= per_proc
        with (trainer.accelerator.no_sync(model) if not last and world > 1 else contextlib.nullcontext()):
            with trainer.autocast():
                losses = forward(mb["tokens"], mb["targets"], positions=mb["positions"], doc_ids=mb["doc_ids"])
            # grads are averaged over processes, so scale the global-token mean by world size
            loss, stats = lm_loss(losses, mb["targets"], mb["modality"], z_loss, denom=n_global / world)
            trainer.backward(loss)
        out_norm = max(out_norm, stats["out_norm"])
        for k in totals:
            totals[k] += stats[k]
    if world > 1:
        t = torch.tensor([totals[k] for k in totals], dtype=torch.float64, device=trainer.device)
        totals = dict(zip(totals, trainer.accelerator.reduce(t, reduction="sum").tolist()))
    return totals, out_norm


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def train_cmd(cfg: TrainConfig) -> int:
    use_all_cores()
    train(cfg)
    return 0
