"""Training speed: forward + backward + AdamW step, ours (eager and compiled) against the peer, in fp32 or
under bf16 autocast (both sides under the same autocast), with the matmul ceiling of the same dtype timed in
the same alternating rounds."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from earlyfusion.model.attention_plan import attention_plan
from earlyfusion.model.compile import compiled
from earlyfusion.model.decoder import Decoder, DecoderConfig
from earlyfusion.core.runtime import autocast
from earlyfusion.training.lm_loss import TokenLosses

from bench_machine import MatmulCeiling, alternate, log, median, timed
from bench_models import build_pair, check_parity, faster_mode, flop_params, flops_per_token, layout_for


def bench_train(preset: str, *, batch: int, seq_len: int, warmup: int, iters: int, vocab_size: int | None = None,
                peer: bool = True, ceiling: MatmulCeiling | None = None, compile: bool = True,
                precision: str = "no") -> dict:
    """tokens/s of forward + backward + AdamW step, ours (eager and, with ``compile``, as ``train --compile``
    runs it; attention by the kernel ``model.attention_plan`` picks, as training does) vs the peer (same
    weights, batch, loss, fused AdamW). "best" is the faster of our two modes.

    ``precision``: "no" (fp32) or "bf16" (every forward under ``torch.autocast`` bf16, as ``train
    --mixed-precision bf16`` runs it; weights, optimizer and loss stay fp32). ``ceiling``: a matmul timed in the
    same alternating rounds (give it the same dtype), so that the fraction of the ceiling compares figures taken
    under the same load from other processes."""
    vocab_size = vocab_size or layout_for(preset).vocab_size
    if peer:
        ours, hf = build_pair(preset, vocab_size, max_seq_len=max(seq_len, 16))
        parity = check_parity(ours, hf, vocab_size)
    else:
        torch.manual_seed(0)
        ours, hf, parity = Decoder(DecoderConfig.from_preset(preset, vocab_size, max_seq_len=max(seq_len, 16))), None, None
    cfg = ours.config
    # as training chooses it: timed compiled where the compiled step is measured (the mode the targets use)
    plan = attention_plan(ours, batch, seq_len, precision=precision, packed=False, compile=compile)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step_fn(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor]) -> Callable[[], None]:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)  # as training
        model.train()

        def step() -> None:
            with autocast(precision, "cpu"):
                loss = loss_of()  # mean next-token cross-entropy, fp32
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    losses_of = TokenLosses(ours)  # ours: the decoder and its loss in one module, as training runs them
    fns = {"ours": step_fn(ours, lambda: losses_of(x, y)[0].mean())}
    compile_s = None
    if compile:
        forward = compiled(losses_of, dynamic=False)
        fns["ours_compiled"] = step_fn(ours, lambda: forward(x, y)[0].mean())
        log(f"  train {preset}: compiling the training step (torch.compile, once)")
        compile_s = timed(fns["ours_compiled"])
    if hf is not None:
        fns["peer"] = step_fn(hf, lambda: F.cross_entropy(hf(input_ids=x).logits.flatten(0, 1).float(), y.reshape(-1)))
    if ceiling is not None:
        fns["ceiling"] = ceiling
    times = alternate(fns, warmup, iters)
    ceiling_times = times.pop("ceiling", None)
    n_tokens = batch * seq_len
    fpt = flops_per_token(cfg, seq_len)
    out = {"preset": preset, "precision": "bf16" if precision == "bf16" else "fp32", "batch": batch,
           "seq_len": seq_len, "vocab_size": vocab_size, "iters": iters, "params": cfg.num_params(),
           "flop_params": flop_params(cfg), "flops_per_token": fpt, "parity_max_abs_logit_diff": parity,
           "compile_s": compile_s, "attention": plan.describe()}
    for k, ts in times.items():
        tps = n_tokens / median(ts)
        out[f"{k}_tokens_per_s"] = tps
        out[f"{k}_gflops"] = tps * fpt / 1e9
        out[f"{k}_step_s"] = median(ts)
    best = faster_mode(out)
    out["best_mode"] = "compiled" if best == "ours_compiled" else "eager"
    out["best_tokens_per_s"], out["best_gflops"] = out[f"{best}_tokens_per_s"], out[f"{best}_gflops"]
    if hf is not None:
        out["speedup"] = out["ours_tokens_per_s"] / out["peer_tokens_per_s"]
        out["best_speedup"] = out["best_tokens_per_s"] / out["peer_tokens_per_s"]
    if ceiling_times is not None:
        out["matmul_gflops_alongside"] = ceiling.rate(median(ceiling_times))
        out["ours_ceiling_fraction_alongside"] = out["ours_gflops"] / out["matmul_gflops_alongside"]
        out["best_ceiling_fraction_alongside"] = out["best_gflops"] / out["matmul_gflops_alongside"]
    return out
