"""The best model by held-out loss: kept in LMRUN/checkpoints/best, and a log line once held-out loss has turned up.

Validation (every ``--eval-every`` steps and at the last step) scores the held-out pairs; the score
is the held-out reading loss plus the held-out drawing loss (``val_loss`` in metrics.jsonl), each a
mean per target token, so that neither direction is ignored while the image codes, many more tokens
per pair, would otherwise dominate. Each new minimum rewrites ``LMRUN/checkpoints/best`` (a checkpoint
directory that pruning, which keeps the newest step-* ones, never touches). The first time the score is
more than ``HELDOUT_RISE`` above its minimum, the log says so once: from then on the run is memorising
its training data.

The best-so-far (step, score, whether the log has said so, and which held-out pairs scored it) is part of
every checkpoint's state, so a resumed run keeps it, unless its held-out pairs are others (a data directory
that gained a val split, say): scores of other pairs do not compare, so the choice starts again; ``--final best`` (the default) makes ``checkpoints/best`` the run's model
(``rundir.set_final``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from earlyfusion.core.checkpoint import CheckpointError, atomic_dir, latest_good, load_json, verify_dir
from earlyfusion.core.logs import log
from earlyfusion.core.rundir import BEST_DIR, CHECKPOINTS_DIR, CONFIG, set_final

HELDOUT_RISE = 0.05
"""Held-out score this far above its minimum (a fraction) is reported as having turned up."""


def heldout_score(val: dict) -> float:
    """The score the best model is chosen by: held-out reading (text) loss + drawing (image) loss."""
    return val["loss_text"] + val["loss_image"]


def _describe(heldout: list | None) -> str:
    return "none" if not heldout else ", ".join(map(str, heldout))[:200]


class BestModel:
    """Tracks the lowest held-out score of a run and keeps its weights in ``out/checkpoints/best``."""

    def __init__(self, out: Path, main: bool, heldout: list | None = None):
        self.dir = Path(out) / CHECKPOINTS_DIR / BEST_DIR
        self.main = main
        self.heldout = heldout  # what identifies the held-out pairs the scores come from (JSON)
        self.step: int | None = None
        self.score = math.inf
        self.warned = False

    def state_dict(self) -> dict:
        return {"step": self.step, "score": self.score if self.step is not None else None, "warned": self.warned,
                "heldout": self.heldout}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore the best-so-far of a checkpoint (None: a checkpoint written before it was tracked); a best-so-far
        scored on other held-out pairs is dropped, with a line in the log."""
        state = state or {}
        if state.get("step") is not None and state.get("heldout", self.heldout) != self.heldout:
            if self.main:
                log.warning("the best model so far (step %d) was scored on other held-out pairs (%s; now %s): its score "
                            "does not compare, so the run's model is chosen again from the next validation",
                            state["step"], _describe(state.get("heldout")), _describe(self.heldout))
            state = {}
        self.step = state.get("step")
        self.score = math.inf if self.step is None else float(state["score"])
        self.warned = bool(state.get("warned", False))
        if self.step is not None and self.main and self.saved_step() is None:
            log.warning("%s is missing or damaged: the best model so far (step %d) is lost; the next new held-out "
                        "minimum writes it again", self.dir, self.step)

    def saved_step(self) -> int | None:
        """The step of the weights in ``self.dir`` (None: none there, or damaged). A resumed run's state can be behind
        it (it was written after the checkpoint resumed from); the resumed run writes that step again."""
        try:
            verify_dir(self.dir)
            return int(load_json(self.dir / CONFIG)["step"])
        except (CheckpointError, OSError, KeyError, TypeError, ValueError):
            return None

    def observe(self, step: int, val: dict, write: Callable[[Path], None]) -> str | None:
        """Score one validation; a new minimum is written with ``write(tmp_dir)`` (main process). Returns the
        line to log when held-out loss has turned up for the first time, else None."""
        score = heldout_score(val)
        if not math.isfinite(score):
            return None
        if score < self.score:
            self.step, self.score = step, score
            if self.main:
                with atomic_dir(self.dir) as tmp:
                    write(tmp)
            return None
        if self.warned or score <= self.score * (1 + HELDOUT_RISE):
            return None
        self.warned = True
        return (f"held-out loss has turned up: {score:.3f} at step {step} is {100 * (score / self.score - 1):.0f}% above "
                f"its minimum {self.score:.3f} at step {self.step}, so the model is memorising its training data; "
                f"{self.dir} keeps the step-{self.step} weights (the run's model unless --final last; fewer --steps, "
                "--augment-views or --dropout make a run learn longer)")


def finish_run(out: Path, final: str, best: BestModel) -> None:
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
