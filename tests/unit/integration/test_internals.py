"""The registry of Megatron internals (megatron_edl.integration.internals): every entry resolves
against the installed megatron-core, and a renamed target fails by name."""

from __future__ import annotations

import dataclasses
import re

import pytest

from megatron_edl.integration import internals


@pytest.mark.parametrize("name", sorted(internals.TOUCHES))
def test_every_touch_still_resolves(name):
    entry = internals.TOUCHES[name]
    assert internals.resolve(entry) is not None
    assert entry.why and entry.remove_when and entry.where


def test_every_order_dependent_handoff_names_a_test_that_exists():
    """A handoff through an override depends on when Megatron calls it, which no signature
    check sees: its entry names the test that fails when the order changes."""
    from pathlib import Path

    root = Path(internals.__file__).resolve().parents[2]
    ordered = [t for t in internals.TOUCHES.values() if t.order]
    assert {t.name for t in ordered} >= {"router-apply-aux-loss", "gpt-dataset-sample-documents"}
    for entry in ordered:
        path, _, test = entry.order.rsplit(" ", 1)[-1].partition("::")
        assert re.search(rf"^def {test}\(", (root / path).read_text(), re.M), (entry.name, path)


def test_touch_names_every_call_site_in_the_registry():
    # Every touch("...") in the package names a registered entry.
    from pathlib import Path

    root = Path(internals.__file__).resolve().parents[1]
    used = set()
    for path in root.rglob("*.py"):
        used.update(re.findall(r'\btouch\("([^"]+)"\)', path.read_text()))
    assert used, "no call site looks its touch up"
    assert used <= set(internals.TOUCHES), sorted(used - set(internals.TOUCHES))


@pytest.mark.parametrize(
    "target, missing",
    [
        ("megatron.core.transformer.moe.router:TopKRouter._no_such_method", "_no_such_method"),
        ("megatron.core.no_such_module:x", "cannot import"),
        ("megatron.core.transformer.moe.router:TopKRouter#_no_such_attribute", "no longer sets"),
    ],
)
def test_a_changed_target_fails_with_its_name(target, missing):
    entry = dataclasses.replace(next(iter(internals.TOUCHES.values())), target=target)
    with pytest.raises(LookupError, match=re.escape(missing)) as err:
        internals.resolve(entry)
    assert entry.name in str(err.value)


def test_a_changed_signature_fails():
    entry = dataclasses.replace(
        next(iter(internals.TOUCHES.values())),
        target="megatron.core.transformer.moe.router:TopKRouter._apply_aux_loss",
        parameters=("probs", "no_such_parameter"),
    )
    with pytest.raises(LookupError, match="no_such_parameter"):
        internals.resolve(entry)


def test_unknown_touch_is_a_named_error():
    with pytest.raises(KeyError, match="no-such-touch"):
        internals.touch("no-such-touch")


def test_all_touches_lists_the_cpu_patches_too():
    from megatron_edl import cpu

    names = [row[0] for row in internals.all_touches()]
    assert set(internals.TOUCHES) <= set(names)
    assert {p.name for p in cpu.PATCHES} <= set(names)
