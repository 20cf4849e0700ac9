"""``earlyfusion sample``: text, images or interleaved output from a trained run.

* text from text:    ``--prompt TEXT`` (streams to stdout)
* text from images:  ``--image PATH [--image PATH ...] [--prompt QUESTION]`` (captioning / QA)
* image from text:   ``--prompt TEXT --modality image --num-samples N --out DIR`` (PNGs + grid.png)
* interleaved:       ``--prompt TEXT --modality auto --out DIR`` (text with [image k] placeholders,
  PNGs and an index.html showing them in order)
* conversations:     ``--chat`` (a session in the terminal), or with a run trained on conversations
  ``--image PATH --prompt QUESTION`` (one question; ``--modality image --out DIR`` for an edit)
"""

from __future__ import annotations

import html
import math
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from PIL import Image

from earlyfusion.core.errors import UserError
from earlyfusion.core.logs import log
from earlyfusion.core.options import MAX_SEED, check_not_file, check_number
from earlyfusion.core.runtime import mixed_precision, use_all_cores
from earlyfusion.sampling.chat import chat_prompt, chat_session
from earlyfusion.sampling.generate import IMAGE_PLACEHOLDER, Sample, SamplingConfig, generate, generate_ids
from earlyfusion.training.data.conversations import ASK
from earlyfusion.tokenizer.preprocess import ImageError, aspect_grid, image_grid, preprocess_for_codes
from earlyfusion.training.data.runs import load_run, question_first, trained_grids

SHEET_TILE = 128
"""Grid sheets are scaled up (nearest neighbour) so each image is at least this many pixels wide."""


# the options a run may give its own defaults for (besides the guidance scale, which applies only where images are
# sampled); the rest always come from the command line or SamplingConfig
RUN_DEFAULTS = ("temperature", "top_k", "top_p", "image_temperature", "image_top_k", "image_top_p")


@dataclass(kw_only=True)
class SampleConfig(SamplingConfig):
    checkpoint: str
    """Run directory of `earlyfusion train` (its newest good checkpoint) or one checkpoints/step-* directory."""
    prompt: str = ""
    """Text prompt (a question or instruction when --image is given)."""
    image: list[str] = field(default_factory=list)
    """Image file(s) to condition on, in order (repeatable)."""
    prompt_first: bool | None = None
    """Put --prompt before the images (--no-prompt-first: after them). Unset: after them, except in a question to a
    run trained on conversations (and in --chat), which is written in the order of the conversations it was trained
    on (text first where the run does not say, as Chameleon's prompts). Set it only to try the other order."""
    chat: bool = False
    """A conversation in the terminal with a run trained on conversations: type a question per line ('/image PATH'
    attaches a picture to the next one, '/reset' starts over, an empty line ends); answers print as text and
    pictures are written to --out (default: ./chat) as PNGs. Outside a session, such a run takes the images and the
    prompt given as one question (an edit where the modality is image)."""
    size: str = ""
    """Draw images of this shape, WxH in pixels (e.g. 48x32): the code grid that keeps that aspect ratio within the
    image tokenizer's largest grid (the same rule that fitted the training images), so the images come out at
    that grid's size. Default: the model chooses among the grids it was trained on. Needs a vocabulary built with
    --grid-tokens, and a size whose grid the model was trained on."""
    out: str = ""
    """Output directory (required for --modality image and auto; optional for text: writes sample-*.txt)."""
    temperature: float | None = None
    """Text temperature; 0 = greedy. Default: the run's (0.7; an imported Chameleon/Anole run carries Chameleon's
    published settings)."""
    top_k: int | None = None
    """Text top-k; 0 = no limit. Default: the run's (20; none for an imported Chameleon/Anole run)."""
    top_p: float | None = None
    """Text nucleus probability; 1 = no limit. Default: the run's (1; 0.9 for an imported Chameleon/Anole run)."""
    image_temperature: float | None = None
    """Image-code temperature; 0 = greedy (every sample of a prompt then draws the same image). Raise it for more
    varied images, lower it for images closer to the prompt. Default: the run's (0.5; 0.7 for an imported
    Chameleon/Anole run)."""
    image_top_p: float | None = None
    """Image-code nucleus probability; 1 = no limit. Default: the run's (1; 0.9 for an imported Chameleon/Anole run)."""

    def __post_init__(self):
        self.resolved({})  # validates every sampling option the user gave
        check_number("seed", self.seed, 0, MAX_SEED)  # the range train and eval take, so a seed means one thing everywhere
        try:
            self.prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 reach argv as surrogate escapes
            raise ValueError("--prompt is not valid UTF-8 text; pass it in a UTF-8 locale or fix its encoding") from None
        if self.modality in ("image", "auto") and not self.out and not self.chat:
            raise ValueError(f"--modality {self.modality} writes image files: give --out DIR")
        if self.chat and (self.prompt or self.image):
            raise ValueError("--chat reads its questions from the terminal ('/image PATH' attaches a picture): "
                             "leave out --prompt and --image")
        check_not_file("out", self.out)
        if self.prompt_first is not None and not self.image and not self.chat:
            raise ValueError("--prompt-first / --no-prompt-first order the prompt and --image files, but no --image "
                             "was given")
        if self.size:
            if self.modality == "text":
                raise ValueError("--size sets the shape of drawn images; it cannot be used with --modality text")
            parse_size(self.size, "--size")

    def resolved(self, run_defaults: dict) -> SamplingConfig:
        """The sampling options to use: what the user gave, else the run's default (``sampling_defaults`` in its
        checkpoint config, written by `earlyfusion import chameleon`), else SamplingConfig's."""
        own = {f.name: f.default for f in fields(SamplingConfig)}
        values = {}
        for f in fields(SamplingConfig):
            v = getattr(self, f.name)
            if v is None and f.name in RUN_DEFAULTS:
                v = run_defaults.get(f.name, own[f.name])
            values[f.name] = v
        if values["cfg"] is None and values["modality"] != "text" and "cfg" in run_defaults:
            values["cfg"] = run_defaults["cfg"]
        return SamplingConfig(**values)


MAX_SIZE = 1 << 16


def parse_size(text: str, option: str) -> tuple[int, int]:
    """"WxH" -> (width, height) in pixels; ValueError naming ``option`` otherwise."""
    parts = text.lower().split("x")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{option} must be WIDTHxHEIGHT in pixels (e.g. 48x32), got {text!r}") from None
    if not (1 <= w <= MAX_SIZE and 1 <= h <= MAX_SIZE):
        raise ValueError(f"{option} sides must be from 1 to {MAX_SIZE} pixels, got {text!r}")
    return w, h


def _px(vq_cfg, grid) -> str:
    """``grid`` (rows, columns) as the WxH pixel size --size takes."""
    height, width = vq_cfg.pixels_of_grid(*grid)
    return f"{width}x{height}"


def drawing_grids(run, size: str) -> list[tuple[int, int]] | None:
    """The code grids drawn images may take: the one ``size`` (WxH) gives, or the grids the run was trained on
    (None: any the vocabulary holds). UserError for a size the vocabulary or the model cannot draw."""

    vocab, vq_cfg = run.vocab, run.vq.cfg
    trained = trained_grids(run)
    if not vocab.grid_tokens:
        if size and parse_size(size, "--size") != vq_cfg.pixels_of_grid(*vocab.grid)[::-1]:
            raise UserError(f"--size {size}: this model draws only {_px(vq_cfg, vocab.grid)} images "
                            "(its vocabulary has no grid tokens; build one with `earlyfusion vocab build "
                            "--grid-tokens` and train on images of other shapes); drop --size")
        return None
    if not size:
        return trained or None
    w, h = parse_size(size, "--size")
    try:
        grid = aspect_grid(w, h, vocab.grid, vq_cfg.downsample, where=f"--size {size}")
    except ImageError as e:
        raise UserError(str(e)) from None
    if trained and grid not in trained:
        known = ", ".join(_px(vq_cfg, g) for g in trained)
        raise UserError(f"--size {size} is a {grid[0]}x{grid[1]} code grid ({_px(vq_cfg, grid)} px), which "
                        f"the model was not trained on; it was trained on {known}: choose one of those")
    return [grid]


def encode_image_files(vq, vocab, paths: list[str]) -> list[torch.Tensor]:
    """Each image file → its (h, w) code grid with the image tokenizer ``vq`` (keeping its aspect ratio where the
    vocabulary has grid tokens); UserError naming a file that is missing or that the vocabulary cannot hold."""
    device = next(vq.parameters()).device
    grids = []
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"--image {p}: no such file")
        pixels = preprocess_for_codes(p, vq.cfg.image_size, vq.cfg.downsample,
                                      vocab.grid if vocab.grid_tokens else None)  # (3, h·ds, w·ds) in [-1, 1]
        with torch.no_grad():
            codes = vq.encode(pixels[None].to(device))[0].cpu()  # (h, w)
        try:
            vocab.check_grid(codes.shape)
        except ValueError as e:
            raise UserError(f"--image {p}: encodes to a {tuple(codes.shape)} code grid, which the vocabulary cannot "
                            f"hold ({e})") from None
        grids.append(codes)
    return grids


def _prompt_segments(cfg: SampleConfig, grids: list[torch.Tensor], question_first: bool = False) -> list:
    """The prompt's pieces in order; ``question_first``: the order unless the user chose one."""
    text = [cfg.prompt] if cfg.prompt else []
    first = question_first if cfg.prompt_first is None else cfg.prompt_first
    return text + grids if first else grids + text


def _save_png(img, path: Path, written: list[Path]) -> None:
    img.save(path)
    written.append(path)


def _write_image_outputs(samples: list[Sample], out: Path, written: list[Path]) -> None:

    images = []
    for i, s in enumerate(samples):
        for img in s.images:
            _save_png(img, out / f"sample-{i:02d}.png", written)
            images.append(img)
    if images:
        sheet = image_grid(images, ncols=math.ceil(math.sqrt(len(images))))
        scale = max(1, SHEET_TILE // images[0].width)
        if scale > 1:

            sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)
        _save_png(sheet, out / "grid.png", written)


def _write_interleaved(samples: list[Sample], out: Path, prompt: str, written: list[Path]) -> None:
    """Per sample: a text file with [image k] placeholders and the PNGs; one index.html in order."""
    page = ["<!doctype html><meta charset='utf-8'><title>earlyfusion samples</title>",
            "<style>body{font-family:sans-serif;max-width:48em}p{white-space:pre-wrap}"
            "img{width:%dpx;image-rendering:pixelated;border:1px solid #ccc}</style>" % SHEET_TILE,
            f"<h1>Samples</h1><p><b>prompt:</b> {html.escape(prompt)}</p>"]
    for i, s in enumerate(samples):
        k = 0
        page.append(f"<h2>sample {i}</h2>")
        for seg in s.segments:
            if isinstance(seg, str):
                page.append(f"<p>{html.escape(seg)}</p>")
            else:
                k += 1
                name = f"sample-{i:02d}-image-{k}.png"
                if k <= len(s.images):
                    _save_png(s.images[k - 1], out / name, written)
                page.append(f"<img src='{name}' alt='{IMAGE_PLACEHOLDER.format(k)}'>")
        txt = out / f"sample-{i:02d}.txt"
        txt.write_text(s.text + "\n", encoding="utf-8")
        written.append(txt)
    index = out / "index.html"
    index.write_text("\n".join(page) + "\n", encoding="utf-8")
    written.append(index)


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def sample_cmd(cfg: SampleConfig) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    use_all_cores()  # the prefill; the per-token steps run on what model.decode_plan finds fastest
    for p in cfg.image:  # fail on a bad path before loading the model
        if not Path(p).is_file():
            raise UserError(f"--image {p}: no such file")

    run = load_run(cfg.checkpoint, device=device)
    try:
        sampling = cfg.resolved(run.config.get("sampling_defaults") or {})
    except (TypeError, ValueError) as e:
        raise UserError(f"{run.path / 'config.json'}: invalid sampling_defaults ({e}); fix or remove them") from None
    if cfg.chat:
        answers = chat_session(run, lambda p: encode_image_files(run.vq, run.vocab, [p])[0], Path(cfg.out or "chat"),
                               image_temperature=sampling.image_temperature, seed=cfg.seed,
                               max_new_tokens=cfg.max_new_tokens,
                               pictures_first=not (question_first(run) if cfg.prompt_first is None else cfg.prompt_first))
        log.info(f"{answers} answer(s)")
        return 0
    grids = drawing_grids(run, cfg.size) if cfg.modality != "text" else None
    # a question (or an edit) to a run trained on conversations with our template; an imported Chameleon's run keeps
    # its raw interleaved prompts (and their guidance) here, and converses with its own template in --chat
    question = bool(run.vocab.chat and run.vocab.chat_id("assistant") is not None and cfg.image and cfg.prompt)
    segments = _prompt_segments(cfg, encode_image_files(run.vq, run.vocab, cfg.image), question and question_first(run))
    out = _out_dir(cfg.out) if cfg.out else None
    stop: list[int] = []
    if question:
        prompt_ids = [chat_prompt(run.vocab, [(ASK, [("i", s) if isinstance(s, torch.Tensor) else ("t", s)
                                                      for s in segments])])]
        stop = [run.vocab.chat_id("eot")]
        if cfg.cfg is None and sampling.modality != "text":
            sampling = replace(sampling, cfg=1.0)  # no unconditional prompt of a conversation to guide against

    live = cfg.modality != "image" and cfg.num_samples == 1

    def stream(i: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    t0 = time.perf_counter()
    if stop:
        samples = generate_ids(run.decoder, run.vocab, prompt_ids, sampling, vq=run.vq,
                               stream=stream if live else None, grids=grids, stop=stop)
    else:
        samples = generate(run.decoder, run.vocab, [segments], sampling, vq=run.vq, stream=stream if live else None,
                           grids=grids)
    dt = time.perf_counter() - t0
    n_tokens = sum(len(s.ids) for s in samples)
    n_images = sum(len(s.images) for s in samples)
    if live:
        print()
    log.info(f"{len(samples)} sample(s), {n_tokens} tokens, {n_images} image(s) in {dt:.1f} s "
             f"({n_tokens / max(dt, 1e-9):.0f} tokens/s) on {device}")
    log.info(f"precision: {mixed_precision(cfg.mixed_precision, device)[1]}")
    written: list[Path] = []
    if cfg.modality == "text":
        for i, s in enumerate(samples):
            if not live:
                print(f"--- sample {i}")
                print(s.text)
            if out is not None:
                path = out / f"sample-{i:02d}.txt"
                path.write_text(s.text + "\n", encoding="utf-8")
                written.append(path)
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
        return 0
    assert out is not None
    if cfg.modality == "image":
        _write_image_outputs(samples, out, written)
    else:
        if not live:
            for i, s in enumerate(samples):
                print(f"--- sample {i}")
                print(s.text)
        _write_interleaved(samples, out, cfg.prompt, written)
    for path in written:
        print(f"wrote {path}")
    return 0
