"""The options of ``earlyfusion train`` (the decoder's trainer): ``TrainConfig``, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from earlyfusion.core.options import MAX_BATCH, MAX_SEED, MAX_STEPS, check_not_file, check_number
from earlyfusion.model.decoder import DECODER_PRESETS
from earlyfusion.model.lora import LORA_TARGETS, LoraSpec
from earlyfusion.training.data import DataConfig
from earlyfusion.training.data.config import MANY_PASSES  # noqa: F401 - named in help texts
from earlyfusion.training.sizing import SIZED_IMAGE_TOKEN_NOISE  # noqa: F401 - named in help texts

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
    trainable: Literal["all", "image-head", "lora"] = "all"
    """Which weights train: all; image-head = only the output-layer rows of the image ids (Anole's recipe for teaching
    a text-only checkpoint to draw; every other weight stays exactly as the init run's); lora = low-rank adapters
    (peft's LoRA) on the --lora-targets projections of the init run, which stays frozen: a fraction of the memory of
    full fine-tuning, and checkpoints that hold only the adapters with a pointer to the init run."""
    lora_rank: int = 16
    """Rank of each LoRA adapter (with --trainable lora); higher learns more and costs more memory."""
    lora_alpha: float | None = None
    """LoRA scale numerator: the adapters' update is scaled by alpha / rank; unset = twice the rank."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input (with --trainable lora)."""
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Projections that get adapters, by module name: qkv (attention's q/k/v), proj (attention's output), gate_up and
    down (the MLP)."""
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
    """Peak learning rate (AdamW, betas 0.9/0.95 as in Chameleon). The default suits the small decoder on codes that
    each hold part of a picture; where each code stands for a whole object (the built-in pictures at 48 px with 16 px
    codes), 3e-4: at 2e-3 the decoder then keeps treating every object's code alike, and at 1e-3 or 5e-4 it learns
    to tell them apart more slowly."""
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
    image_positions: bool | None = None
    """Give each place within an image span a learned embedding, one table for a document's first picture and one
    for its later ones, so that each image code carries where in its picture it lies and which picture that is, not
    only how far it is from other tokens (RoPE). Try it where questions name places in pictures ("what shape is at
    the top left?"); on the built-in conversations it helps those and hurts others, such as which of two pictures
    holds a shape (measured in docs/conversations.md). Off by default, as in Chameleon; such runs cannot be exported
    to transformers. Unset: off for a new decoder, kept from --init-from."""
    image_token_noise: float | None = None
    """Fraction of the image codes of pictures being drawn (caption first) replaced in the input by a random image
    code; the targets stay the true codes, and pictures being read keep theirs. The model then cannot finish a
    picture by recalling the exact codes it has drawn so far and has to follow the caption. Unset = {SIZED_IMAGE_TOKEN_NOISE} when the run
    would show its image-caption pairs more than {MANY_PASSES} times (drawings of new captions then come out as copies of
    training images without it), else 0; a resumed run keeps what it started with."""
    val_split: str | None = None
    """Split of each data directory to validate on (the best model is the one with the lowest loss there): unset = its
    validation folder (validation, valid, val or dev) when it has one, else test. Validating on the training split
    (--split) is refused unless named here."""
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
    sharding: Literal["none", "fsdp"] = "none"
    """How the processes of `accelerate launch` hold the decoder: none = each holds all of it (DDP); fsdp = each
    holds 1/N of the weights, gradients and AdamW state (FSDP2, one unit per transformer block) and checkpoints
    hold them as shards beside the whole model.safetensors. Either trains the same steps; accelerate's FSDP config
    turns fsdp on. With fsdp no sample sheets are drawn during training. See docs/several-gpus.md."""

    def __post_init__(self):
        if self.init_from is None:
            if self.vocab is None or self.image_tokenizer is None:
                raise ValueError("--vocab and --image-tokenizer are required (or --init-from RUN, whose vocabulary and "
                                 "image tokenizer are then used)")
            if self.preset is None:
                self.preset = "small"
        if self.final not in ("last", "best"):
            raise ValueError(f"--final {self.final!r} is not one of last, best")
        if self.sharding not in ("none", "fsdp"):
            raise ValueError(f"--sharding {self.sharding!r} is not one of none, fsdp")
        if self.trainable not in ("all", "image-head", "lora"):
            raise ValueError(f"--trainable {self.trainable!r} is not one of all, image-head, lora")
        if self.trainable != "all" and self.init_from is None:
            raise ValueError(f"--trainable {self.trainable} adapts a trained decoder; give --init-from RUN")
        check_number("lora-rank", self.lora_rank, 1, 4096)
        if self.lora_alpha is not None:
            check_number("lora-alpha", self.lora_alpha, 0)
        check_number("lora-dropout", self.lora_dropout, 0, 1, hi_open=True)
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown or not self.lora_targets:
            raise ValueError(f"--lora-targets {' '.join(self.lora_targets)}: choose among {', '.join(LORA_TARGETS)}")
        if self.trainable == "lora" and self.sharding != "none":
            raise ValueError("--trainable lora keeps the base frozen and small adapters: train it without --sharding")
        if self.preset is not None and self.preset not in DECODER_PRESETS:
            raise ValueError(f"--preset {self.preset!r} is not one of {', '.join(DECODER_PRESETS)}")
        for name in ("steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            check_number(name.replace("_", "-"), getattr(self, name), 1, MAX_STEPS)
        check_number("batch-size", self.batch_size, 1, MAX_BATCH)
        if self.micro_batch_size is not None:
            check_number("micro-batch-size", self.micro_batch_size, 1, MAX_BATCH)
        if self.context_len is not None:
            check_number("context-len", self.context_len, MIN_CONTEXT)
        check_number("lr", self.lr, 0)
        if self.lr == 0:
            raise ValueError("--lr must be positive, got 0")
        check_number("min-lr-ratio", self.min_lr_ratio, 0, 1)
        for name in ("warmup_steps", "eval_every", "max_nonfinite"):
            check_number(name.replace("_", "-"), getattr(self, name), 0, MAX_STEPS)
        for name in ("weight_decay", "grad_clip", "z_loss"):
            check_number(name.replace("_", "-"), getattr(self, name), 0)
        if self.dropout is not None:
            check_number("dropout", self.dropout, 0, 1, hi_open=True)
        if self.image_token_noise is not None:
            check_number("image-token-noise", self.image_token_noise, 0, 1, hi_open=True)
        check_number("seed", self.seed, 0, MAX_SEED)
        if self.val_split is not None and (not self.val_split.strip() or "/" in self.val_split):
            raise ValueError(f"--val-split {self.val_split!r} must name a split folder, e.g. val or test")
        for name in ("out", "init_from"):
            check_not_file(name.replace("_", "-"), getattr(self, name))  # the data options are validated by DataConfig

    def lora(self) -> LoraSpec | None:
        """The adapters' shape under --trainable lora (None otherwise)."""
        if self.trainable != "lora":
            return None
        alpha = 2.0 * self.lora_rank if self.lora_alpha is None else self.lora_alpha
        return LoraSpec(self.lora_rank, alpha, self.lora_dropout, tuple(self.lora_targets))
