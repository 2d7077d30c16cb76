"""The EDL coefficient over training: a delayed start and a linear warm-up.

    beta(i) = 0                                  for i < s
    beta(i) = beta * min(1, (i - s + 1) / w)     for i >= s   (w > 0)
    beta(i) = beta                               for i >= s   (w = 0)

with i the 0-based index of the optimizer step (Megatron's ``args.curr_iteration`` while the
step runs: 0 for the first step of a run started from scratch, the checkpoint's iteration after a
resume), s = ``--moe-edl-start-iter`` and w = ``--moe-edl-warmup-iters``. Step s gets beta / w,
step s + w - 1 the full beta. Why: the log form's gradient is 1 / (JSD + eps) per pair, largest
at the start of training, when the domain means are nearly equal (docs/method.md); a warm-up is
common practice for auxiliary losses. The loss and its metrics are computed during the delay as
well (with a zero weight), so the log shows the divergence the model reaches without EDL.
"""

from __future__ import annotations

__all__ = ["edl_coefficient"]


def edl_coefficient(
    *, coeff: float, iteration: int | None, start_iter: int, warmup_iters: int
) -> float:
    """beta(i) of the module docstring.

    Args:
        coeff: beta, the full coefficient (>= 0).
        iteration: i, the 0-based optimizer step; ``None`` (no training loop, e.g. a unit test
            calling the router directly) gives the full ``coeff``.
        start_iter: s (>= 0).
        warmup_iters: w (>= 0).

    Returns:
        The coefficient of this step.
    """
    if iteration is None:
        return coeff
    if iteration < start_iter:
        return 0.0
    if warmup_iters == 0:
        return coeff
    return coeff * min(1.0, (iteration - start_iter + 1) / warmup_iters)
