"""A learning-rate schedule that can't run as written is scaled to the run at submit, with a printed note.

training/optim.py `lr_scale` warms up over optim.warmup_steps, then (wsd) holds the peak and decays linearly over
the last optim.decay_fraction of train.max_steps. A warmup longer than the run would never reach the peak nor
decay; a wsd decay that starts before the warmup ends would cut the warmup short. Both happen to every short run
of a job file written for a long one (`train.max_steps=30` against the recipe's 50 warmup steps, a pipeline's
`train.max_steps=20` for every stage), so the warmup is scaled rather than the job refused: to a tenth of the run,
and at most up to where the decay starts. The note names the value written into the run's config.
"""

from __future__ import annotations

from typing import Optional

WARMUP_SHARE = 10  # a warmup longer than the run becomes max_steps // WARMUP_SHARE steps (at least 1)


def fit_schedule(cfg) -> Optional[str]:
    """Scale optim.warmup_steps to fit train.max_steps; the note to print when it changed, else None."""
    if "optim" not in cfg or "train" not in cfg:  # a data job trains nothing
        return None
    steps, optim = cfg.train.max_steps, cfg.optim
    if steps == 0:  # only validates and saves
        return None
    warmup, why = optim.warmup_steps, ""
    if warmup > steps:
        warmup, why = max(1, steps // WARMUP_SHARE), f"longer than the run (train.max_steps={steps})"
    if optim.schedule == "wsd":
        decay = max(1, round(optim.decay_fraction * steps))  # as training/optim.py counts it
        if warmup + decay > steps:
            warmup = steps - decay
            why = why or (
                f"overlapping the wsd decay (the last {decay} of {steps} steps at "
                f"optim.decay_fraction={optim.decay_fraction}): no stable phase"
            )
    if warmup == optim.warmup_steps:
        return None
    note = (
        f"note: optim.warmup_steps={optim.warmup_steps} is {why}; this run warms up over {warmup} steps instead "
        f"(set optim.warmup_steps yourself to choose)"
    )
    optim.warmup_steps = warmup
    return note
