"""Hand-built routing statistics for the analysis and report tests.

Shape legend: L layers, D domains, E experts.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from megatron_edl.analysis.routing_stats import RoutingStats


def stats_from_loads(
    loads_LDE: np.ndarray,
    tokens_LD: np.ndarray,
    *,
    topk: int = 2,
    domains: tuple[str, ...] | None = None,
    layers: tuple[int, ...] | None = None,
    step: int = 10,
    source: str = "train",
    entropy_per_token: float = 0.5,
    unlabelled_tokens: float = 0.0,
    lm_loss_D: np.ndarray | None = None,
) -> RoutingStats:
    """Statistics whose hard shares and mean dense probabilities both equal ``loads_LDE``.

    Args:
        loads_LDE: Per-domain expert distributions (rows sum to 1), shape ``(L, D, E)``.
        tokens_LD: Tokens per domain, shape ``(L, D)``.
        topk: k (the top-k counts are ``k * tokens * loads``).
        domains: Domain names (default ``d0, d1, ...``).
        layers: Layer numbers (default ``1..L``).
        step: The dump's step.
        source: ``train`` or ``probe``.
        entropy_per_token: H(p_t) of every token (nats).
        unlabelled_tokens: Tokens without a label per layer, routed uniformly.
        lm_loss_D: Per-domain mean LM loss (optional, probe-style).
    """
    loads_LDE = np.asarray(loads_LDE, dtype=np.float64)
    tokens_LD = np.asarray(tokens_LD, dtype=np.float64)
    num_layers, num_domains, num_experts = loads_LDE.shape
    uniform_LE = np.full((num_layers, num_experts), unlabelled_tokens / num_experts)
    extra = {}
    if lm_loss_D is not None:
        extra = {"lm_loss_sums_D": lm_loss_D * tokens_LD[0], "lm_loss_tokens_D": tokens_LD[0]}
    return RoutingStats(
        step=step,
        num_iterations=0 if source == "probe" else 5,
        source=source,
        layers=layers or tuple(range(1, num_layers + 1)),
        domains=domains or tuple(f"d{d}" for d in range(num_domains)),
        num_experts=num_experts,
        topk=topk,
        topk_counts_LDE=topk * tokens_LD[:, :, None] * loads_LDE,
        prob_sums_LDE=tokens_LD[:, :, None] * loads_LDE,
        tokens_LD=tokens_LD,
        entropy_sums_LD=entropy_per_token * tokens_LD,
        unlabelled_topk_counts_LE=topk * uniform_LE,
        unlabelled_prob_sums_LE=uniform_LE,
        unlabelled_tokens_L=np.full(num_layers, unlabelled_tokens),
        unlabelled_entropy_sums_L=np.full(num_layers, entropy_per_token * unlabelled_tokens),
        **extra,
    )


def specialised_loads(
    num_layers: int, num_domains: int, num_experts: int, strength: float
) -> np.ndarray:
    """Domain d prefers the block of experts ``d * E/D ...``; ``strength`` 0 = uniform, 1 = only
    its block."""
    block = num_experts // num_domains
    loads_LDE = np.full((num_layers, num_domains, num_experts), (1 - strength) / num_experts)
    for d in range(num_domains):
        loads_LDE[:, d, d * block : (d + 1) * block] += strength / block
    return loads_LDE


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("src", "href") and v]


def html_links(index: Path) -> list[str]:
    """Every ``src``/``href`` of an HTML file, in order."""
    parser = _Links()
    parser.feed(Path(index).read_text(encoding="utf-8"))
    return parser.links
