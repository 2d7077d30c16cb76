"""EDL through Megatron's real training loop on CPU: gradients proven by layout equivalence.

From one single-process checkpoint, 3 training steps with the EDL loss on (the EDL gradient moves
the weights at every step) give the same LM and EDL losses under every parallel layout as a
single-process run on the same global micro-batch, which is what method.md's gradient-scale rule
demands. The load-balancing loss is off here so that only EDL's gradient scale is under test
(its own scale across layouts is covered in test_pretrain_cpu.py).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from megatron_edl.analysis.routing_stats import load_run
from tests.helpers.data_helpers import write_labelled_prefix
from tests.helpers.megatron_runs import (
    LAYOUTS,
    TINY_MOE_GPT,
    RunResult,
    run_pretrain,
    with_flag_values,
)

pytestmark = pytest.mark.slow

EDL = [
    "--moe-edl-coeff", "0.5", "--moe-edl-mock-domains", "3",
    "--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0",
]  # fmt: skip
STEPS = 3


def _assert_trained(result: RunResult, iters: int) -> None:
    assert result.returncode == 0, result.describe()
    assert sorted(result.iterations) == list(range(1, iters + 1)), result.describe()


@pytest.fixture(scope="module")
def edl_checkpoint(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("edl_ckpt")
    result = run_pretrain(
        1, [*TINY_MOE_GPT, *EDL, "--train-iters", "3", "--save", str(ckpt), "--save-interval", "3"]
    )
    _assert_trained(result, 3)
    return ckpt


def _stats_dir(ckpt, nproc: int, extra) -> Path:
    """Where a run from the checkpoint writes its routing statistics (one dump per step)."""
    key = hashlib.sha1(repr((nproc, tuple(extra))).encode()).hexdigest()[:12]
    return Path(ckpt).parent / f"routing_stats_{key}"


def _from_checkpoint(ckpt, nproc: int, extra: list[str]) -> RunResult:
    flags = [
        *TINY_MOE_GPT, *EDL, "--train-iters", str(STEPS),
        "--load", str(ckpt), "--finetune", "--no-load-optim", "--no-load-rng", *extra,
        "--moe-edl-stats-interval", "1", "--moe-edl-stats-dir", str(_stats_dir(ckpt, nproc, extra)),
    ]  # fmt: skip
    result = run_pretrain(nproc, flags)
    _assert_trained(result, STEPS)
    return result


def _assert_same_routing_stats(got_dir: Path, want_dir: Path) -> None:
    """The routing telemetry of a layout equals the single-process run's, step by step.

    Token counts must match exactly (no token counted twice or lost, whatever the sharding,
    pipeline stage or recompute); top-k counts up to a near-tie flipped by rounding.
    """
    got, want = load_run(got_dir), load_run(want_dir)
    assert [s.step for s in got] == [s.step for s in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want, strict=True):
        assert g.layers == w.layers == (1, 2) and g.num_iterations == 1
        np.testing.assert_array_equal(g.tokens_LD, w.tokens_LD)
        assert g.tokens_LD.sum() == 2 * 4 * 64  # layers x global batch x sequence
        np.testing.assert_allclose(g.topk_counts_LDE, w.topk_counts_LDE, atol=2)
        np.testing.assert_allclose(g.prob_sums_LDE, w.prob_sums_LDE, rtol=1e-4)
        np.testing.assert_allclose(g.entropy_sums_LD, w.entropy_sums_LD, rtol=1e-5)


@pytest.fixture(scope="module")
def reference(edl_checkpoint):
    """Single-process runs from the checkpoint, cached by their extra flags."""
    cache: dict[tuple[str, ...], RunResult] = {}

    def get(*extra: str) -> RunResult:
        if extra not in cache:
            cache[extra] = _from_checkpoint(edl_checkpoint, 1, list(extra))
        return cache[extra]

    return get


MBS4 = ("--micro-batch-size", "4")
PER_TOKEN = ("--calculate-per-token-loss",)
# The module's checkpoint has no window state: Megatron's own option lets the window start empty.
WINDOW = ("--moe-edl-window-decay", "0.5", "--dist-ckpt-strictness", "log_unexpected")
FULL_RECOMPUTE = (
    "--recompute-granularity", "full",
    "--recompute-method", "uniform", "--recompute-num-layers", "1",
)  # fmt: skip

# name -> (layout flags, flags of the equivalent single-process run). The micro-batch size of
# the reference is the number of samples one EDL statistic covers: global scope on DP=2 reduces
# over both replicas' micro-batches (4 samples); local scope keeps one replica's (2 samples), like
# two micro-batches of one process. With one process both scopes are the same statistics.
CASES = {
    "dp2_global": ([*LAYOUTS["dp2"], "--moe-edl-scope", "global"], MBS4),
    "dp2_local": ([*LAYOUTS["dp2"], "--moe-edl-scope", "local"], ()),
    "ep2_alltoall_global": (LAYOUTS["ep2_alltoall"], MBS4),
    "tp2_sp": (LAYOUTS["tp2_sp"], ()),
    "tp2_sp_per_token_loss": ([*LAYOUTS["tp2_sp"], *PER_TOKEN], PER_TOKEN),
    "dp2_global_per_token_loss": ([*LAYOUTS["dp2"], *PER_TOKEN], (*MBS4, *PER_TOKEN)),
    "tp2_sp_ep2": (
        [*LAYOUTS["tp2_sp"], *LAYOUTS["ep2_alltoall"], "--expert-tensor-parallel-size", "1"],
        (),
    ),
    "pp2": (LAYOUTS["pp2"], ()),
    # 1F1B with 4 micro-batches: forwards of later micro-batches run before earlier backwards,
    # and with full recompute each router runs again in the backward: labels must not go stale.
    "pp2_4_microbatches_recompute": (
        [*LAYOUTS["pp2"], "--micro-batch-size", "1", *FULL_RECOMPUTE],
        ("--micro-batch-size", "1"),
    ),
    # The statistics window: its state advances once per micro-batch (the recompute pass, in
    # micro-batch order), and across the steps, identically on every rank.
    "pp2_4_microbatches_recompute_window": (
        [*LAYOUTS["pp2"], "--micro-batch-size", "1", *FULL_RECOMPUTE, *WINDOW],
        ("--micro-batch-size", "1", *WINDOW),
    ),
    "dp2_global_window": ([*LAYOUTS["dp2"], *WINDOW], (*MBS4, *WINDOW)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_edl_layout_equivalence(case, edl_checkpoint, reference):
    extra, reference_flags = CASES[case]
    result = _from_checkpoint(edl_checkpoint, 2, list(extra))
    ref = reference(*reference_flags)
    for name in ("lm loss", "edl_loss"):
        got, want = result.losses(name), ref.losses(name)
        assert got == pytest.approx(want, rel=5e-6), (case, name, got, want)
    _assert_same_routing_stats(
        _stats_dir(edl_checkpoint, 2, extra), _stats_dir(edl_checkpoint, 1, reference_flags)
    )


@pytest.mark.parametrize(
    "recompute",
    [FULL_RECOMPUTE, ("--recompute-granularity", "selective", "--recompute-modules", "moe")],
    ids=["full", "selective_moe"],
)
def test_recompute_gives_the_same_training(recompute, edl_checkpoint, reference):
    """The router runs again in the backward (after later micro-batches' forwards)."""
    flags = ("--micro-batch-size", "1")
    result = _from_checkpoint(edl_checkpoint, 1, [*flags, *recompute])
    ref = reference(*flags)
    assert max(ref.losses("edl_loss")) > 0  # EDL active in these micro-batches
    for name in ("lm loss", "edl_loss", "grad norm"):
        assert result.losses(name) == pytest.approx(ref.losses(name), rel=1e-6), name
    _assert_same_routing_stats(
        _stats_dir(edl_checkpoint, 1, [*flags, *recompute]), _stats_dir(edl_checkpoint, 1, flags)
    )


def test_label_map_groups_domains(tmp_path):
    """3 stored mock domains -> 2 loss domains; stored domain 2 ignored in a second map."""
    merge = tmp_path / "merge.yaml"
    merge.write_text("domains: [a, b]\nmap:\n  0: a\n  1: a\n  2: b\n")
    drop = tmp_path / "drop.yaml"
    drop.write_text("domains: [a, b]\nmap:\n  0: a\n  1: b\n  2: null\n")
    flags = [*TINY_MOE_GPT, *EDL, "--train-iters", "3"]

    def most_domains(extra: list[str]) -> float:
        # edl_domains: domains present per micro-batch, averaged over micro-batches and layers.
        result = run_pretrain(1, [*flags, *extra])
        _assert_trained(result, 3)
        return max(r["edl_domains"] for r in result.iterations.values())

    assert most_domains([]) > 2.0
    for path in (merge, drop):
        assert 1.0 < most_domains(["--moe-edl-label-map", str(path)]) <= 2.0, path
    uncovered = tmp_path / "uncovered.yaml"
    uncovered.write_text("domains: [a]\nmap:\n  0: a\n")
    result = run_pretrain(1, [*flags, "--moe-edl-label-map", str(uncovered)])
    assert result.returncode != 0 and not result.iterations
    assert "uncovered.yaml" in result.log


def _check_per_domain_validation(result: RunResult, domains: list[str]) -> None:
    """Every validation line has each domain's loss and token share, and the share-weighted
    mean of the domain losses is the overall loss (every token of the mock data is labelled)."""
    assert result.validations, result.describe()
    assert "token share/" in result.log and not re.search(r"token share/\S+ PPL", result.log)
    for values in result.validations:
        shares = [values[f"token share/{d}"] for d in domains]
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)
        mean = sum(s * values[f"lm loss/{d}"] for s, d in zip(shares, domains, strict=True))
        assert mean == pytest.approx(values["lm loss"], rel=1e-5), values


def test_edl_is_logged_and_raises_divergence():
    """EDL's metrics reach Megatron's log line, and the loss makes routing more domain-specific.

    ``edl_loss`` (log form: mean over domain pairs of -log(JSD + eps)) is reported by both runs;
    a lower value is a higher divergence. The baseline's coefficient is 1e-9: its EDL gradient is
    negligible, but the router still computes and logs the statistics. Both runs (DP=2) also
    report the validation loss per domain.
    """
    flags = [
        *with_flag_values(TINY_MOE_GPT, eval_iters="2", eval_interval="25", split="90,10,0"),
        "--train-iters", "50", "--moe-edl-mock-domains", "3",
    ]  # fmt: skip
    edl = run_pretrain(2, [*flags, "--moe-edl-coeff", "0.3"])
    base = run_pretrain(2, [*flags, "--moe-edl-coeff", "1e-9"])
    for run in (edl, base):
        _assert_trained(run, 50)
        _check_per_domain_validation(run, ["domain0", "domain1", "domain2"])
        for name in ("edl_loss", "edl_jsd", "edl_mi", "edl_domains", "load_balancing_loss"):
            assert name in run.iterations[50], (name, run.iterations[50])
        assert run.iterations[50]["edl_domains"] == 3.0
    first = edl.iterations[1]["edl_loss"]
    assert base.iterations[1]["edl_loss"] == pytest.approx(first, rel=1e-4)  # same start
    edl_end = sum(edl.iterations[i]["edl_loss"] for i in range(41, 51)) / 10
    base_end = sum(base.iterations[i]["edl_loss"] for i in range(41, 51)) / 10
    assert edl_end < base_end - 0.5, (edl_end, base_end)
    assert edl.iterations[50]["edl_jsd"] > base.iterations[50]["edl_jsd"]


def test_virtual_pipeline_intermediate_stages(tmp_path):
    """PP=2 with 2 virtual stages per rank: the middle model chunks get no tokens from stock
    Megatron, yet their MoE layers need labels; 4 micro-batches, interleaved 1F1B."""
    four_layers = [*TINY_MOE_GPT, *EDL, "--num-layers", "4"]
    ckpt = run_pretrain(
        1, [*four_layers, "--train-iters", "3", "--save", str(tmp_path), "--save-interval", "3"]
    )
    _assert_trained(ckpt, 3)
    flags = [
        *four_layers, "--train-iters", str(STEPS), "--micro-batch-size", "1",
        "--load", str(tmp_path), "--finetune", "--no-load-optim", "--no-load-rng",
    ]  # fmt: skip
    ref = run_pretrain(1, flags)
    vpp = run_pretrain(
        2,
        [
            *flags,
            "--pipeline-model-parallel-size",
            "2",
            "--num-virtual-stages-per-pipeline-rank",
            "2",
        ],
    )
    for result in (ref, vpp):
        _assert_trained(result, STEPS)
    assert max(ref.losses("edl_loss")) > 0
    for name in ("lm loss", "edl_loss"):
        assert vpp.losses(name) == pytest.approx(ref.losses(name), rel=5e-6), name


def test_multi_token_prediction_layers():
    """MTP layers' routers get (and consume) the labels too; a leak would raise at step 2."""
    flags = [*TINY_MOE_GPT, *EDL, "--train-iters", "3", "--mtp-num-layers", "1"]
    result = run_pretrain(1, flags)
    _assert_trained(result, 3)
    assert "mtp_1 loss" in result.iterations[3]
    assert max(result.losses("edl_loss")) > 0


def test_repeated_multi_token_prediction_layer():
    """``--mtp-use-repeated-layer``: one MTP router runs at each of the 2 depths of a forward;
    it gets the labels once per depth (an empty queue would raise at the second depth), and the
    variance and orthogonality losses run there too. The 1/N scaling is checked in
    tests/unit/integration/test_gpu_paths.py."""
    flags = [
        *TINY_MOE_GPT, *EDL, "--train-iters", "3",
        "--moe-variance-loss-coeff", "0.01", "--moe-ortho-loss-coeff", "0.01",
        "--mtp-num-layers", "2", "--mtp-use-repeated-layer",
    ]  # fmt: skip
    result = run_pretrain(1, flags)
    _assert_trained(result, 3)
    assert {"mtp_1 loss", "mtp_2 loss"} <= set(result.iterations[3]), result.describe()
    for name in ("edl_loss", "variance_loss", "ortho_loss"):
        assert min(result.losses(name)) > 0, name


def test_indexed_data_with_sidecar_and_per_prefix_domains(tmp_path, edl_checkpoint):
    """Real indexed data: labels from the .domains sidecar, or one domain per blend prefix.

    The sidecar run starts from the EDL checkpoint; stock training (no EDL flag: Megatron's own
    GPTDataset, stock router) loads the same checkpoint and reads the same samples, so its
    first LM loss (before any update) is the EDL run's, digit for digit: an EDL checkpoint is
    a stock checkpoint (the router adds no state; tests/unit/integration/test_spec.py checks the
    keys).
    """
    names = {"code": 0, "prose": 1, "math": 2}
    mixed = tmp_path / "mixed"
    write_labelled_prefix(mixed, [i % 3 for i in range(300)], names)
    stock_flags = [
        *TINY_MOE_GPT, "--train-iters", "3", "--data-cache-path", str(tmp_path / "cache"),
    ]  # fmt: skip
    stock_flags.remove("--mock-data")
    flags = [*stock_flags, "--moe-edl-coeff", "0.1"]
    load = ["--load", str(edl_checkpoint), "--finetune", "--no-load-optim", "--no-load-rng"]
    result = run_pretrain(1, [*flags, "--data-path", str(mixed), *load])
    _assert_trained(result, 3)
    assert max(result.losses("edl_domains")) > 1.0
    stock = run_pretrain(1, [*stock_flags, "--data-path", str(mixed), *load])
    _assert_trained(stock, 3)
    assert "edl_loss" not in stock.iterations[1]
    assert stock.iterations[1]["lm loss"] == result.iterations[1]["lm loss"]

    code, prose = tmp_path / "code", tmp_path / "prose"
    write_labelled_prefix(code, [0] * 150, names)
    write_labelled_prefix(prose, [1] * 150, names)
    per_prefix = tmp_path / "per_prefix.yaml"
    per_prefix.write_text(f"{code}: code\n{prose}: prose\n")
    blend = ["--data-path", "1", str(code), "1", str(prose)]
    result = run_pretrain(1, [*flags, *blend, "--moe-edl-domains-per-prefix", str(per_prefix)])
    _assert_trained(result, 3)
    assert 1.0 < max(result.losses("edl_domains")) <= 2.0
