"""The launcher's EDL set-up on parsed Megatron arguments (nothing is launched).

``edl_config_from_args``, ``labels_config_from_args`` and ``install_edl`` are what both our
launcher and the patched Megatron-LM script run: their errors must name the flag or file, and
with no EDL flag they must change nothing.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from megatron_edl.config import EDLConfigError
from megatron_edl.pretrain_gpt import edl_config_from_args, install_edl, labels_config_from_args
from tests.helpers.megatron_runs import TINY_MOE_GPT


def parse(flags: list[str], monkeypatch):
    """Megatron's ``parse_args`` with our flags (no validation, no distributed set-up)."""
    from megatron.training.arguments import parse_args

    from megatron_edl.pretrain_gpt import extra_args_provider

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt", *flags])
    return parse_args(extra_args_provider)


def _indexed(tmp_path, labels: list[int] | None):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_edl.data.sidecar import write_sidecar

    prefix = tmp_path / "corpus"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for i in range(6):
        builder.add_document(np.array([i + 1, i + 2, 1023]), [3])
    builder.finalize(f"{prefix}.idx")
    if labels is not None:
        write_sidecar(prefix, np.asarray(labels), {"code": 0, "prose": 1, "math": 2})
    return str(prefix)


def _data_flags(prefix: str) -> list[str]:
    flags = [f for f in TINY_MOE_GPT if f != "--mock-data"]
    return [*flags, "--data-path", prefix]


def test_no_edl_flag_is_stock(monkeypatch):
    args = parse(list(TINY_MOE_GPT), monkeypatch)
    model_cfg = types.SimpleNamespace(transformer_layer_spec="stock spec")
    provider, step = object(), object()
    assert install_edl(args, model_cfg, provider, step) == (provider, step)
    assert args.labels_config is None and not args.edl_config.enabled
    assert model_cfg.transformer_layer_spec == "stock spec"


def test_eval_per_domain_loads_labels_without_the_loss(monkeypatch):
    args = parse(
        [*TINY_MOE_GPT, "--moe-edl-eval-per-domain", "--moe-edl-mock-domains", "3"], monkeypatch
    )
    model_cfg = types.SimpleNamespace(transformer_layer_spec="stock spec")
    provider, step = install_edl(args, model_cfg, object(), object())
    from megatron_edl.integration import gpt

    steps = provider.__self__  # megatron-edl's labelled provider and step, bound to the config
    assert isinstance(steps, gpt.LabelledSteps) and steps.edl is args.edl_config
    assert (provider.__func__, step.__func__) == (
        gpt.LabelledSteps.train_valid_test_datasets_provider,
        gpt.LabelledSteps.forward_step,
    )
    assert step.__self__ is provider.__self__
    assert model_cfg.transformer_layer_spec == "stock spec"  # no EDL router without the loss
    assert not args.edl_config.enabled
    assert args.labels_config.domain_names == ("domain0", "domain1", "domain2")


def test_edl_without_moe_names_the_flags(monkeypatch):
    flags = [f for f in TINY_MOE_GPT]
    i = flags.index("--num-experts")
    del flags[i : i + 2]
    args = parse([*flags, "--moe-edl-coeff", "0.1"], monkeypatch)
    with pytest.raises(EDLConfigError, match="--num-experts"):
        edl_config_from_args(args)


def test_missing_sidecar_names_the_file(tmp_path, monkeypatch):
    prefix = _indexed(tmp_path, labels=None)
    args = parse([*_data_flags(prefix), "--moe-edl-coeff", "0.1"], monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"corpus\.domains"):
        edl_config_from_args(args)


def test_domain_names_come_from_the_sidecar_or_the_label_map(tmp_path, monkeypatch):
    prefix = _indexed(tmp_path, labels=[0, 1, 2, 0, 1, 2])
    args = parse([*_data_flags(prefix), "--moe-edl-coeff", "0.1"], monkeypatch)
    assert labels_config_from_args(args).domain_names == ("code", "prose", "math")
    label_map = tmp_path / "map.yaml"
    label_map.write_text("domains: [text, code]\nmap:\n  code: code\n  prose: text\n  math: text\n")
    args = parse(
        [*_data_flags(prefix), "--moe-edl-coeff", "0.1", "--moe-edl-label-map", str(label_map)],
        monkeypatch,
    )
    cfg = labels_config_from_args(args)
    assert (cfg.num_domains, cfg.domain_names) == (2, ("text", "code"))


def test_label_map_that_does_not_match_the_data_names_the_key(tmp_path, monkeypatch):
    prefix = _indexed(tmp_path, labels=[0, 1, 2, 0, 1, 2])
    label_map = tmp_path / "map.yaml"
    label_map.write_text("domains: [text]\nmap:\n  poetry: text\n")
    args = parse(
        [*_data_flags(prefix), "--moe-edl-coeff", "0.1", "--moe-edl-label-map", str(label_map)],
        monkeypatch,
    )
    with pytest.raises(EDLConfigError, match=r"map\.yaml.*poetry"):
        edl_config_from_args(args)


def test_label_map_that_does_not_cover_the_data_fails_before_the_model(tmp_path, monkeypatch):
    from megatron_edl.integration import dataset

    prefix = _indexed(tmp_path, labels=[0, 1, 2, 0, 1, 2])
    label_map = tmp_path / "map.yaml"
    label_map.write_text("domains: [text, code]\nmap:\n  code: code\n  prose: text\n")
    args = parse(
        [*_data_flags(prefix), "--moe-edl-coeff", "0.1", "--moe-edl-label-map", str(label_map)],
        monkeypatch,
    )
    with pytest.raises(EDLConfigError, match=r"map\.yaml.*math"):
        edl_config_from_args(args)
    # A covering map: the launcher's resolution is the one the training dataset build reuses.
    label_map.write_text("domains: [text, code]\nmap:\n  code: code\n  '*': text\n")
    cfg = labels_config_from_args(args)
    monkeypatch.setattr(dataset, "_resolve_blend", None)  # a second resolution would fail
    blend = dataset.resolve_blend_domains([prefix], "sidecar", labels=cfg)
    assert blend.loss_ids[prefix].tolist() == [1, 0, 0, 1, 0, 0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--cpu"], "--cpu needs the launcher"),
        (["--config-yaml", "run.yaml"], "--config-yaml run.yaml was not expanded"),
    ],
)
def test_launcher_only_flags_are_refused_elsewhere(flags, message, monkeypatch):
    args = parse([*TINY_MOE_GPT, *flags], monkeypatch)
    with pytest.raises(ValueError, match=message):
        install_edl(args, types.SimpleNamespace(transformer_layer_spec=None), None, None)


@pytest.mark.parametrize(
    "extra, warned",
    [
        ([], True),  # 2 sequences per step over 3 domains
        (["--moe-edl-window-decay", "0.9"], False),  # x 10 micro-batches in the window
        (["--micro-batch-size", "16", "--global-batch-size", "32"], False),
    ],
)
def test_thin_statistics_warn_at_start(extra, warned, monkeypatch, capsys):
    from megatron_edl.pretrain_gpt import warn_thin_statistics

    flags = [*TINY_MOE_GPT, "--moe-edl-coeff", "0.1", "--moe-edl-mock-domains", "3", *extra]
    args = parse(flags, monkeypatch)
    args.data_parallel_size = 1
    cfg = edl_config_from_args(args)
    estimate = warn_thin_statistics(args, cfg, labels_config_from_args(args).num_domains)
    err = capsys.readouterr().err
    assert ("sequences per domain" in err) is warned, (estimate, err)
    expected = {(): 2 / 3, ("--moe-edl-window-decay", "0.9"): 2 / 3 / 0.1}.get(tuple(extra))
    if expected is not None:
        assert estimate == pytest.approx(expected)
