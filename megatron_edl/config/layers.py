"""Which layers EDL applies to: the ``--moe-edl-layers`` syntax and the checks against the model.

``parse_layers`` reads the flag; ``validate_against_model`` checks an ``EDLConfig`` against the
model's shape (is there an MoE at all, which layers are MoE layers), which ``EDLConfig`` alone
cannot know. Imports neither ``megatron`` nor ``torch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from megatron_edl.core.options import EDLConfigError

__all__ = ["COEFF_FLAG", "LAYERS_FLAG", "as_layers", "parse_layers", "validate_against_model"]

COEFF_FLAG = "--moe-edl-coeff"
LAYERS_FLAG = "--moe-edl-layers"


class LayerOptions(Protocol):
    """What :func:`validate_against_model` reads of an ``EDLConfig`` (no import of
    :mod:`megatron_edl.config.edl`, which imports this module)."""

    coeff: float
    layers: tuple[int, ...] | None

    @property
    def enabled(self) -> bool: ...


def _flag(field: str) -> str:
    return {"coeff": COEFF_FLAG, "layers": LAYERS_FLAG}[field]


def as_layers(value: Any) -> tuple[int, ...] | None:
    """Normalise ``layers``: ``None``, a ``parse_layers`` spec, or a sequence of ints >= 1."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_layers(value)
    flag = _flag("layers")
    if not isinstance(value, Sequence):
        raise EDLConfigError(
            f"{flag} must be a sequence of layer numbers or a string spec, got {value!r}"
        )
    for layer in value:
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 1:
            raise EDLConfigError(
                f"{flag}: layer numbers are 1-based integers, got {layer!r} in {value!r}"
            )
    if not value:
        raise EDLConfigError(
            f"{flag} lists no layer, got {value!r}; to disable EDL set {_flag('coeff')} 0"
        )
    return tuple(sorted(set(value)))


def _is_number(text: str) -> bool:
    """ASCII decimal digits only: ``str.isdigit`` also accepts "²", which ``int`` refuses."""
    return text.isascii() and text.isdigit()


def parse_layers(spec: str | None, num_layers: int | None = None) -> tuple[int, ...] | None:
    """Parse the ``--moe-edl-layers`` syntax into sorted, unique 1-based layer numbers.

    ``"all"`` (any case) or ``None`` means every MoE layer and gives ``None``. Otherwise a
    comma-separated list of layer numbers and inclusive ranges ``a-b``; whitespace is ignored
    and overlaps are merged: ``"1,3,5-8"`` -> ``(1, 3, 5, 6, 7, 8)``.

    Args:
        spec: The flag's value.
        num_layers: The model's number of transformer layers; when given, layers above it are
            errors.

    Returns:
        The layer numbers, or ``None`` for every MoE layer.

    Raises:
        EDLConfigError: On a malformed token, a layer < 1, a reversed range, an empty list or a
            layer above ``num_layers``; the message names ``--moe-edl-layers`` and the token.
    """
    flag = _flag("layers")
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise EDLConfigError(f"{flag} must be a string, got {spec!r}")
    if spec.strip().lower() == "all":
        return None
    layers: set[int] = set()
    for raw_token in spec.split(","):
        token = "".join(raw_token.split())
        if not token:
            raise EDLConfigError(f"{flag}: empty entry in {spec!r}; expected e.g. '1,3,5-8'")
        first, sep, last = token.partition("-")
        if not _is_number(first) or (sep and not _is_number(last)):
            raise EDLConfigError(
                f"{flag}: bad entry {token!r} in {spec!r}; expected a layer number or a "
                f"range 'a-b' of 1-based layer numbers, or 'all'"
            )
        lo = int(first)
        hi = int(last) if sep else lo
        if lo < 1:
            raise EDLConfigError(f"{flag}: layer numbers are 1-based, got {token!r} in {spec!r}")
        if hi < lo:
            raise EDLConfigError(f"{flag}: reversed range {token!r} in {spec!r}")
        if num_layers is not None and hi > num_layers:
            raise EDLConfigError(
                f"{flag}: {token!r} in {spec!r} is beyond the model's {num_layers} layers"
            )
        layers.update(range(lo, hi + 1))
    return tuple(sorted(layers))


def _moe_layer_numbers(num_layers: int, moe_layer_freq: int | Sequence[int]) -> tuple[int, ...]:
    """1-based numbers of the MoE layers, as Megatron's GPT layer specs derive them.

    An int N puts an MoE layer at every layer number ``l`` with ``(l - 1) % N == 0``; a list
    holds one 0/1 entry per layer (``--moe-layer-freq`` after Megatron's ``moe_freq_type``).
    """
    if isinstance(moe_layer_freq, int) and not isinstance(moe_layer_freq, bool):
        if moe_layer_freq < 1:
            raise EDLConfigError(f"--moe-layer-freq must be >= 1, got {moe_layer_freq!r}")
        return tuple(n for n in range(1, num_layers + 1) if (n - 1) % moe_layer_freq == 0)
    if isinstance(moe_layer_freq, Sequence) and not isinstance(moe_layer_freq, str):
        if len(moe_layer_freq) != num_layers or any(v not in (0, 1) for v in moe_layer_freq):
            raise EDLConfigError(
                f"--moe-layer-freq must be an int or a list of {num_layers} zeros and ones "
                f"(one per layer), got {list(moe_layer_freq)!r}"
            )
        return tuple(n for n, v in enumerate(moe_layer_freq, start=1) if v)
    raise EDLConfigError(
        f"--moe-layer-freq must be an int or a list of 0/1, got {moe_layer_freq!r}"
    )


def validate_against_model(
    cfg: LayerOptions,
    *,
    num_moe_experts: int | None,
    num_layers: int,
    moe_layer_freq: int | Sequence[int] = 1,
) -> tuple[int, ...]:
    """Check the EDL options against the model's shape.

    Args:
        cfg: The EDL config.
        num_moe_experts: Megatron's ``--num-experts`` (``None`` or 0 without MoE).
        num_layers: Megatron's ``--num-layers``.
        moe_layer_freq: Megatron's ``--moe-layer-freq``, after ``moe_freq_type``: an int N
            (an MoE layer every N layers, starting at layer 1) or one 0/1 per layer.

    Returns:
        The 1-based numbers of the layers EDL applies to (empty when EDL is disabled).

    Raises:
        EDLConfigError: EDL is enabled without MoE, ``--moe-edl-layers`` lists a layer that
            does not exist or is not an MoE layer, or the model has no MoE layer at all.
    """
    if not cfg.enabled:
        return ()
    coeff_flag, layers_flag = _flag("coeff"), _flag("layers")
    if not num_moe_experts:
        raise EDLConfigError(
            f"{coeff_flag} {cfg.coeff} enables EDL, which needs an MoE model, but "
            f"--num-experts is {num_moe_experts!r}; set --num-experts or {coeff_flag} 0"
        )
    if num_layers < 1:
        raise EDLConfigError(f"--num-layers must be >= 1, got {num_layers!r}")
    moe_layers = _moe_layer_numbers(num_layers, moe_layer_freq)
    if not moe_layers:
        raise EDLConfigError(
            f"{coeff_flag} {cfg.coeff} enables EDL, but --moe-layer-freq {moe_layer_freq!r} "
            "makes no layer an MoE layer"
        )
    if cfg.layers is None:
        return moe_layers
    beyond = [n for n in cfg.layers if n > num_layers]
    if beyond:
        raise EDLConfigError(
            f"{layers_flag} lists layers {beyond} beyond the model's {num_layers} layers "
            f"(--num-layers)"
        )
    dense = [n for n in cfg.layers if n not in moe_layers]
    if dense:
        raise EDLConfigError(
            f"{layers_flag} lists layers {dense} that are not MoE layers (--moe-layer-freq "
            f"{moe_layer_freq!r}); the MoE layers are {list(moe_layers)}"
        )
    return cfg.layers
