"""The launcher's set-up on parsed Megatron arguments, and its start-time refusals.

``run_config_from_args`` and ``install_edl`` (:mod:`megatron_edl.integration.install`) are what
both our launcher and the patched Megatron-LM script run: their errors must name the flag or
file, and with no megatron-edl flag they must change nothing.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from megatron_edl.config import EDLConfigError
from megatron_edl.integration.install import install_edl, run_config_from_args
from tests.helpers.megatron_runs import TINY_MOE_GPT


def parse(flags: list[str], monkeypatch):
    """Megatron's ``parse_args`` with our flags (no validation, no distributed set-up)."""
    from megatron.training.arguments import parse_args

    from megatron_edl.integration.install import extra_args_provider

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt", *flags])
    return parse_args(extra_args_provider)


def indexed(tmp_path, labels: list[int] | None):
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


def test_a_loss_installs_the_router_bound_to_the_run_config_and_registers_its_metrics(
    monkeypatch,
):
    """The layer-spec provider binds ``args.edl_run_config`` (the registry's losses read their
    branches from it); the enabled losses' metrics, weighted ones included, reach the log."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe import moe_logging

    from megatron_edl.integration.losses.orthogonality import OrthogonalityMoELayer

    flags = ["--moe-variance-loss-coeff", "0.1", "--moe-ortho-loss-coeff", "0.2"]
    args = parse([*TINY_MOE_GPT, *flags], monkeypatch)
    base = get_gpt_layer_local_spec(num_experts=4)
    model_cfg = types.SimpleNamespace(transformer_layer_spec=base)
    provider, step = object(), object()
    moe_logging.destroy_moe_metrics_tracker()
    try:
        assert install_edl(args, model_cfg, provider, step) == (provider, step)  # no labels
        names = moe_logging.get_moe_metrics_tracker().aux_loss_metric_names
        assert names == [
            "variance_loss",
            "weighted_variance_loss",
            "ortho_loss",
            "weighted_ortho_loss",
        ]
    finally:
        moe_logging.destroy_moe_metrics_tracker()
    spec = model_cfg.transformer_layer_spec(model_config=None)
    mlp = spec.submodules.mlp
    assert mlp.func is OrthogonalityMoELayer and mlp.keywords["run_config"] is args.edl_run_config
    assert mlp.keywords["submodules"].router.keywords == {"run_config": args.edl_run_config}
    assert args.edl_run_config.variance.coeff == 0.1


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
        run_config_from_args(args)


def test_missing_sidecar_names_the_file(tmp_path, monkeypatch):
    prefix = indexed(tmp_path, labels=None)
    args = parse([*_data_flags(prefix), "--moe-edl-coeff", "0.1"], monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"corpus\.domains"):
        run_config_from_args(args)


def test_domain_names_come_from_the_sidecar_or_the_label_map(tmp_path, monkeypatch):
    prefix = indexed(tmp_path, labels=[0, 1, 2, 0, 1, 2])
    args = parse([*_data_flags(prefix), "--moe-edl-coeff", "0.1"], monkeypatch)
    assert run_config_from_args(args).labels.domain_names == ("code", "prose", "math")
    label_map = tmp_path / "map.yaml"
    label_map.write_text("domains: [text, code]\nmap:\n  code: code\n  prose: text\n  math: text\n")
    args = parse(
        [*_data_flags(prefix), "--moe-edl-coeff", "0.1", "--moe-edl-label-map", str(label_map)],
        monkeypatch,
    )
    cfg = run_config_from_args(args).labels
    assert (cfg.num_domains, cfg.domain_names) == (2, ("text", "code"))


def test_label_map_that_does_not_match_the_data_names_the_key(tmp_path, monkeypatch):
    prefix = indexed(tmp_path, labels=[0, 1, 2, 0, 1, 2])
    label_map = tmp_path / "map.yaml"
    label_map.write_text("domains: [text]\nmap:\n  poetry: text\n")
    args = parse(
        [*_data_flags(prefix), "--moe-edl-coeff", "0.1", "--moe-edl-label-map", str(label_map)],
        monkeypatch,
    )
    with pytest.raises(EDLConfigError, match=r"map\.yaml.*poetry"):
        run_config_from_args(args)


def test_label_map_that_does_not_cover_the_data_fails_before_the_model(tmp_path, monkeypatch):
    from megatron_edl.integration import dataset

    prefix = indexed(tmp_path, labels=[0, 1, 2, 0, 1, 2])
    label_map = tmp_path / "map.yaml"
    label_map.write_text("domains: [text, code]\nmap:\n  code: code\n  prose: text\n")
    args = parse(
        [*_data_flags(prefix), "--moe-edl-coeff", "0.1", "--moe-edl-label-map", str(label_map)],
        monkeypatch,
    )
    with pytest.raises(EDLConfigError, match=r"map\.yaml.*math"):
        run_config_from_args(args)
    # A covering map: the launcher's resolution is the one the training dataset build reuses.
    label_map.write_text("domains: [text, code]\nmap:\n  code: code\n  '*': text\n")
    cfg = run_config_from_args(args).labels
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
    from megatron_edl.integration.install import warn_thin_statistics

    flags = [*TINY_MOE_GPT, "--moe-edl-coeff", "0.1", "--moe-edl-mock-domains", "3", *extra]
    args = parse(flags, monkeypatch)
    args.data_parallel_size = 1
    cfg = run_config_from_args(args).edl
    estimate = warn_thin_statistics(args, cfg, run_config_from_args(args).labels.num_domains)
    err = capsys.readouterr().err
    assert ("sequences per domain" in err) is warned, (estimate, err)
    expected = {(): 2 / 3, ("--moe-edl-window-decay", "0.9"): 2 / 3 / 0.1}.get(tuple(extra))
    if expected is not None:
        assert estimate == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# Start-time refusals (issue 26, items 7, 12 and 16): one error naming the flag or file, before
# the model is built
# ---------------------------------------------------------------------------------------------


def _mock_edl(*extra: str) -> list[str]:
    return [*TINY_MOE_GPT, "--moe-edl-coeff", "0.1", *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--moe-edl-mock-domains", "1"],
            r"needs at least two loss domains.*--moe-edl-mock-domains 1",
        ),
        (["--moe-edl-mock-domains", "0"], r"^--moe-edl-mock-domains must be >= 1, got 0"),
        (["--moe-edl-mock-domains", "100000"], r"^--moe-edl-mock-domains 100000: .* 1022 bands"),
        (["--moe-edl-layers", "\u00b2"], r"^--moe-edl-layers: bad entry '\u00b2'"),
    ],
)
def test_mock_flags_the_run_cannot_use_are_refused(extra, message, monkeypatch):
    args = parse(_mock_edl(*extra), monkeypatch)
    with pytest.raises(EDLConfigError, match=message):
        run_config_from_args(args)


def test_labels_without_the_loss_may_have_one_domain(monkeypatch):
    args = parse([*TINY_MOE_GPT, "--moe-edl-eval-per-domain", "--moe-edl-mock-domains", "1"],
                 monkeypatch)  # fmt: skip
    assert run_config_from_args(args).labels.num_domains == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("domains: [a, b]\nmap: {code: null, prose: null, math: null}\n", "to no loss domain"),
        ("domains: [text]\nmap: {'*': text}\n", "to 1 loss domain"),
    ],
)
def test_a_label_map_leaving_fewer_than_two_domains_is_refused(
    text, message, tmp_path, monkeypatch
):
    prefix = indexed(tmp_path, labels=[0, 1, 2, 0, 1, 2])
    label_map = tmp_path / "map.yaml"
    label_map.write_text(text)
    flags = [*_data_flags(prefix), "--moe-edl-coeff", "0.1", "--moe-edl-label-map", str(label_map)]
    with pytest.raises(EDLConfigError, match=rf"{label_map} \(--moe-edl-label-map\).*{message}"):
        run_config_from_args(parse(flags, monkeypatch))


def test_mock_data_with_an_uncovered_label_map_is_refused_at_start(tmp_path, monkeypatch):
    label_map = tmp_path / "map.yaml"
    label_map.write_text("domains: [a, b]\nmap: {0: a, 1: b}\n")  # mock ids 2 and 3 uncovered
    args = parse(_mock_edl("--moe-edl-label-map", str(label_map)), monkeypatch)
    with pytest.raises(EDLConfigError, match=rf"{label_map}: .*does not cover 2 stored label"):
        run_config_from_args(args)


def test_the_loss_domains_are_the_ids_the_data_uses(tmp_path, monkeypatch):
    # A vocabulary with a large retired id: 2 loss domains, not 32,640.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_edl.data.sidecar import write_sidecar

    prefix = str(tmp_path / "corpus")
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for i in range(4):
        builder.add_document(np.array([i + 1, 1023]), [2])
    builder.finalize(f"{prefix}.idx")
    write_sidecar(prefix, np.array([0, 32639, 0, 32639]), {"code": 0, "web": 1, "old": 32639})
    cfg = run_config_from_args(
        parse([*_data_flags(prefix), "--moe-edl-coeff", "0.1"], monkeypatch)
    ).labels
    assert (cfg.num_domains, cfg.domain_names) == (2, ("code", "old"))


def test_a_flipped_sidecar_id_is_refused_at_start(tmp_path, monkeypatch):
    from megatron_edl.data.sidecar import SidecarMismatchError

    prefix = indexed(tmp_path, labels=[0, 1, 2, 0, 1, 2])
    sidecar = tmp_path / "corpus.domains"
    data = bytearray(sidecar.read_bytes())
    data[-2:] = np.int16(32639).tobytes()
    sidecar.write_bytes(bytes(data))
    args = parse([*_data_flags(prefix), "--moe-edl-coeff", "0.1"], monkeypatch)
    with pytest.raises(
        SidecarMismatchError, match=r"corpus\.domains: sequence 5 has domain id 32639"
    ):
        run_config_from_args(args)


def test_an_unusable_stats_dir_is_refused_at_start(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    flags = [*TINY_MOE_GPT, "--moe-edl-stats-interval", "1", "--moe-edl-stats-dir", f"{blocker}/s"]
    with pytest.raises(ValueError, match=rf"^--moe-edl-stats-dir {blocker}/s: .*below the file"):
        run_config_from_args(parse(flags, monkeypatch))


def _window_checkpoint(folder, num_domains: int, num_experts: int) -> None:
    """A torch_dist checkpoint holding only the EDL window of 2 layers (its last dim D*E + D)."""
    import torch
    import torch.distributed.checkpoint as dcp

    from megatron_edl.checkpoint import TRACKER

    step = folder / "iter_0000002"
    step.mkdir(parents=True)
    window = torch.zeros(2, num_domains * (num_experts + 1))
    dcp.save(
        {"decoder.layers.mlp.router.edl_window": window},
        storage_writer=dcp.FileSystemWriter(str(step)),
        no_dist=True,
    )
    (step / "metadata.json").write_text("{}")
    (folder / TRACKER).write_text("2")


def test_resuming_the_window_with_another_domain_count_is_refused_at_start(tmp_path, monkeypatch):
    from megatron_edl.checkpoint import CheckpointError

    _window_checkpoint(tmp_path / "ckpt", num_domains=3, num_experts=4)  # TINY: 4 experts
    flags = _mock_edl("--moe-edl-window-decay", "0.5", "--load", str(tmp_path / "ckpt"))
    model_cfg = types.SimpleNamespace(transformer_layer_spec=None)
    args = parse([*flags, "--moe-edl-mock-domains", "3"], monkeypatch)
    install_edl(args, model_cfg, object(), object())  # the same domain count: accepted
    args = parse([*flags, "--moe-edl-mock-domains", "5"], monkeypatch)
    with pytest.raises(
        CheckpointError, match=r"window .* of 3 loss domains x 4 experts, this run has 5"
    ):
        install_edl(args, types.SimpleNamespace(transformer_layer_spec=None), object(), object())


def _launch(tmp_path, *argv: str, module: str = "megatron_edl.pretrain_gpt", timeout: float = 240):
    """``python -m module argv`` in ``tmp_path`` on CPU: (exit status, stderr's error lines);
    a refusal prints no traceback."""
    import os
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, [line for line in proc.stderr.splitlines() if "error:" in line]


@pytest.mark.parametrize("what", ["folder", "latin-1"])
def test_an_unreadable_config_yaml_is_one_line_naming_it(what, tmp_path):
    path = tmp_path / "run.yaml"
    if what == "folder":
        path.mkdir()
    else:
        path.write_bytes("MODEL:\n  num-layers: 2  # \u00e9\n".encode("latin-1"))
    rc, errors = _launch(tmp_path, "--cpu", "--config-yaml", str(path))
    assert rc == 2 and len(errors) == 1, errors
    expected = "is a folder" if what == "folder" else "is not UTF-8 text"
    assert errors[0].startswith(
        f"megatron_edl.pretrain_gpt: error: {path}: the run config {expected}"
    )


def test_a_start_time_refusal_exits_2_with_one_line(tmp_path):
    # Megatron parses the flags (a few seconds), megatron-edl refuses before building the model.
    rc, errors = _launch(tmp_path, "--cpu", *_mock_edl("--moe-edl-mock-domains", "100000"))
    assert rc == 2, errors
    assert errors == [
        "megatron_edl.pretrain_gpt: error: --moe-edl-mock-domains 100000: each mock domain needs "
        "its own band of token ids, and the vocabulary (1024, --vocab-size) holds at most 1022 "
        "bands"
    ]


@pytest.mark.parametrize("state", ["missing", "empty", "iter only"])
def test_the_probe_refuses_a_load_without_a_checkpoint(state, tmp_path):
    from megatron_edl.probe import check_checkpoint

    load = tmp_path / "ckpt"
    if state != "missing":
        load.mkdir()
    if state == "iter only":
        (load / "iter_0000005").mkdir()
    message = {
        "missing": "no such folder",
        "empty": r"no latest_checkpointed_iteration\.txt \(and no iter_\* folder\)",
        "iter only": r"it holds iter_0000005: pass --ckpt-step N",
    }[state]
    with pytest.raises(ValueError, match=rf"^--load {load}: .*{message}"):
        check_checkpoint(["--load", str(load), "--eval-iters", "2"])
    if state == "iter only":  # --ckpt-step names the folder: accepted
        check_checkpoint(["--load", str(load), "--ckpt-step", "5"])
    rc, errors = _launch(
        tmp_path, "--out", "probe", "--cpu", "--load", str(load), module="megatron_edl.probe"
    )
    assert rc == 2 and len(errors) == 1 and f"--load {load}: " in errors[0], errors
    assert not (tmp_path / "probe").exists()


def test_the_probe_accepts_a_tracker(tmp_path):
    from megatron_edl.probe import check_checkpoint

    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")
    check_checkpoint([f"--load={tmp_path}"])
