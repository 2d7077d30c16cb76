"""The EDL math of one router call as two fusable pieces, compiled or eager.

The router's EDL path has one collective in the middle (the SUM all-reduce of the per-domain
statistics), so it is split at that point into two functions of :mod:`megatron_edl.core.edl`
calls, each a candidate for ``torch.compile``::

    pre-reduce   (logits_TE | probs_TE, d_T, w_T) --edl_statistics--> (sums_DE, counts_D)
                 p_t = softmax(z_t),  A_j = Σ_t w_t 1[d_t = j] p_t,  n_j = Σ_t w_t 1[d_t = j]
    all-reduce   (done by the caller, never inside compiled code)
    post-reduce  (sums_DE, counts_D) --edl_step--> loss, mean JSD, M, I(E; D)
                 L_ED = (1 / C(M,2)) Σ_{j<k} -log(JSD(p̄_j‖p̄_k) + eps)  (or -JSD), p̄_j = A_j / n_j

Eagerly these are about a hundred small operations per call, forward and backward (each a kernel
launch on a GPU); compiled with inductor they become a handful of fused kernels: the softmax, the
weighted per-domain sums and, in the backward, the sums' gather with the softmax backward; the
(D, D, E) JSD pass, its reductions and the metrics. ``tools/count_edl_kernels.py`` counts them.

Paths (``--moe-edl-fused``): ``off`` runs the functions eagerly; ``on`` compiles them
(``dynamic=True``: one graph for every token count T) and falls back to eager, with one warning,
where compiling is unavailable or fails; ``auto`` is ``on`` on CUDA and ``off`` elsewhere (on CPU
the first compile takes tens of seconds and gains little: docs/BENCHMARKS.md). Both paths compute
the same formulas; compiled code may reorder floating-point reductions, so fp32 results agree to
about 1e-6 relative (tests/unit/core/test_edl_fused.py), and fp64 exactness tests use the eager
path.

No communication and no Megatron here: pure math plus the choice of how to run it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from megatron_edl.core import edl

__all__ = ["EAGER", "EDLPath", "EDLStepOutput", "edl_statistics", "edl_step", "select_path"]

logger = logging.getLogger(__name__)


class EDLStepOutput(NamedTuple):
    """Result of ``edl_step``: the loss and the metrics the router records.

    Attributes:
        loss: L_ED, differentiable scalar (fp32, or fp64 for fp64 inputs).
        mean_jsd: Mean JSD over the pairs of present domains, detached scalar.
        num_present: M, the number of domains with n_j > 0, int64 scalar tensor.
        mutual_information: I(E; D) of the statistics, detached scalar (``edl_mi``).
    """

    loss: Tensor
    mean_jsd: Tensor
    num_present: Tensor
    mutual_information: Tensor


def edl_statistics(
    *,
    logits_TE: Tensor | None = None,
    probs_TE: Tensor | None = None,
    domain_ids_T: Tensor,
    weights_T: Tensor | None,
    num_domains: int,
    score_function: str = "softmax",
) -> tuple[Tensor, Tensor]:
    """Pre-reduce piece: p_t from the logits (unless given), then A_j and n_j of the local tokens.

        A_j = Σ_t w_t · 1[d_t = j] · p_t   (sums_DE),     n_j = Σ_t w_t · 1[d_t = j]   (counts_D)

    Exactly one of ``logits_TE`` (p_t = ``edl.routing_probs`` of ``score_function`` is computed
    here, fused with the sums) and ``probs_TE`` (dense probabilities computed elsewhere, e.g.
    Megatron's aux-loss scores) is given. Ids are not validated (the hot path:
    ``edl.domain_sums(validate=False)``).

    Args:
        logits_TE: Router logits z_t, shape ``(T, E)``, or ``None``.
        probs_TE: Dense routing probabilities p_t, shape ``(T, E)``, or ``None``.
        domain_ids_T: Domain ids d_t in [-1, num_domains), shape ``(T,)``.
        weights_T: Token weights w_t, shape ``(T,)``, or ``None`` for w_t = 1.
        num_domains: D.
        score_function: The router's score function for p_t (``edl.SCORE_FUNCTIONS``).

    Returns:
        ``(sums_DE, counts_D)`` as ``edl.domain_sums`` returns them.

    Raises:
        ValueError: If not exactly one of ``logits_TE`` and ``probs_TE`` is given.
    """
    if (logits_TE is None) == (probs_TE is None):
        raise ValueError("edl_statistics needs exactly one of logits_TE and probs_TE")
    if probs_TE is None:
        probs_TE = edl.routing_probs(logits_TE=logits_TE, score_function=score_function)
    return edl.domain_sums(
        probs_TE=probs_TE,
        domain_ids_T=domain_ids_T,
        weights_T=weights_T,
        num_domains=num_domains,
        validate=False,
    )


def edl_step(*, sums_DE: Tensor, counts_D: Tensor, form: str, eps: float) -> EDLStepOutput:
    """Post-reduce piece: ``edl.edl_loss`` and ``edl.mutual_information`` of reduced statistics.

    Args:
        sums_DE: A, shape ``(D, E)``, after the all-reduce (and any accumulation).
        counts_D: n, shape ``(D,)``, same scope.
        form: ``"log"`` or ``"linear"`` (see ``edl.edl_loss``).
        eps: eps of the log form.

    Returns:
        An ``EDLStepOutput``.
    """
    out = edl.edl_loss(sums_DE=sums_DE, counts_D=counts_D, form=form, eps=eps, with_matrix=False)
    mi = edl.mutual_information(sums_DE=sums_DE, counts_D=counts_D)
    return EDLStepOutput(out.loss, out.mean_jsd, out.num_present, mi)


class EDLPath(NamedTuple):
    """The two pieces of one router call, and whether they are compiled."""

    statistics: Callable[..., tuple[Tensor, Tensor]]
    step: Callable[..., EDLStepOutput]
    compiled: bool


EAGER = EDLPath(edl_statistics, edl_step, compiled=False)
"""The eager path (``--moe-edl-fused off``)."""

_compiled: EDLPath | None = None
_compile_failed = False
_probed: set[tuple[str, torch.dtype]] = set()


def _compile() -> EDLPath:
    """The compiled pieces (built once per process; ``torch.compile`` itself is lazy)."""
    global _compiled
    if _compiled is None:
        _compiled = EDLPath(
            _guarded(torch.compile(edl_statistics, dynamic=True), edl_statistics),
            # (D, E) are fixed per model: static shapes, and form and eps constants of the
            # graph (a dynamic graph would take eps as a tensor and read it back every call).
            _guarded(torch.compile(edl_step, dynamic=False), edl_step),
            compiled=True,
        )
    return _compiled


def _fall_back(error: BaseException) -> None:
    """Switch this process to the eager path, warning once."""
    global _compile_failed
    if not _compile_failed:
        logger.warning(
            "EDL: torch.compile of the EDL math failed (%s: %s); using the eager path "
            "(--moe-edl-fused off gives the same without trying)",
            type(error).__name__,
            str(error).splitlines()[0] if str(error) else "",
        )
    _compile_failed = True


def _guarded(compiled_fn: Callable, eager_fn: Callable) -> Callable:
    """``compiled_fn``, or ``eager_fn`` once compiling has failed (here or in another piece)."""

    def call(**kwargs):
        if not _compile_failed:
            try:
                return compiled_fn(**kwargs)
            except Exception as error:  # compile errors surface at the first call
                _fall_back(error)
        return eager_fn(**kwargs)

    return call


def _probe(path: EDLPath, device: torch.device, dtype: torch.dtype) -> None:
    """Compile and run both pieces, forward and backward, on a small input of this device.

    A backward that fails to compile fails inside autograd, where ``_guarded`` cannot catch it;
    the probe compiles it up front so that such a failure falls back to eager instead.
    """
    gen = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(8, 4, generator=gen).to(device, dtype).requires_grad_(True)
    domain_ids_T = torch.tensor([0, 1, 1, -1, 0, 2, 2, 1], device=device)
    weights_T = torch.rand(8, generator=gen).to(device)
    try:
        sums_DE, counts_D = path.statistics(
            logits_TE=logits_TE, domain_ids_T=domain_ids_T, weights_T=weights_T, num_domains=3
        )
        path.step(sums_DE=sums_DE, counts_D=counts_D, form="log", eps=1e-6).loss.backward()
    except Exception as error:
        _fall_back(error)


def select_path(
    fused: bool | None, device: torch.device, dtype: torch.dtype = torch.float32
) -> EDLPath:
    """The path to run: compiled (``fused`` True), eager (False) or by device (None).

    ``None`` (``--moe-edl-fused auto``) compiles on CUDA only. The first compiled selection per
    (device type, dtype) runs a small probe (forward and backward) so that a missing compiler
    or a failing backward falls back to eager with one warning, before training depends on it.

    Args:
        fused: True (``on``), False (``off``) or None (``auto``).
        device: Device of the router's logits.
        dtype: Dtype of the router's logits.

    Returns:
        The ``EDLPath`` to call.
    """
    if fused is None:
        fused = device.type == "cuda"
    if not fused or _compile_failed:
        return EAGER
    path = _compile()
    if (device.type, dtype) not in _probed:
        _probed.add((device.type, dtype))
        _probe(path, device, dtype)
    return EAGER if _compile_failed else path
