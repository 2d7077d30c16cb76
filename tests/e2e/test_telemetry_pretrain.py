"""Routing telemetry through Megatron's real training loop, the probe and the report, end to end.

A baseline run (EDL loss off: the labels are loaded for the telemetry alone) with expert
parallelism writes training dumps; the evaluation probe loads its checkpoint in one process and
writes a probe dump whose per-domain LM loss is the one Megatron prints; the report reads both.
Equality of the statistics across parallel layouts (DP, EP, TP+SP, PP, recompute) against a
single process is asserted on the layout-equivalence runs of ``test_edl_pretrain.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from megatron_edl.analysis import report
from megatron_edl.analysis.routing_stats import load_run
from tests.helpers.megatron_runs import LAYOUTS, TINY_MOE_GPT, run_pretrain, with_flag_values
from tests.helpers.routing_stats_helpers import html_links

pytestmark = pytest.mark.slow

DOMAINS = ("domain0", "domain1", "domain2")
TOKENS_PER_ITERATION = 4 * 64  # global batch x sequence length of TINY_MOE_GPT


def test_baseline_dumps_probe_and_report(tmp_path):
    ckpt, probe_dir, out = tmp_path / "ckpt", tmp_path / "probe", tmp_path / "report"
    flags = [
        *TINY_MOE_GPT, "--moe-edl-mock-domains", "3", "--train-iters", "3",
        "--moe-edl-stats-interval", "2", "--save", str(ckpt), "--save-interval", "3",
        *LAYOUTS["ep2_alltoall"],
    ]  # fmt: skip
    result = run_pretrain(2, flags)
    assert result.returncode == 0 and sorted(result.iterations) == [1, 2, 3], result.describe()
    assert "edl_loss" not in result.iterations[3]  # the EDL loss is off

    dumps = load_run(ckpt / "routing_stats")  # the default directory: <--save>/routing_stats
    assert [(d.step, d.num_iterations) for d in dumps] == [(2, 2), (3, 1)]  # interval, end
    for dump in dumps:
        assert dump.domains == DOMAINS and dump.layers == (1, 2) and dump.topk == 2
        assert dump.run["moe_edl_coeff"] == 0 and dump.run["expert_model_parallel_size"] == 2
        tokens = TOKENS_PER_ITERATION * dump.num_iterations
        np.testing.assert_array_equal(dump.tokens_LD.sum(axis=1), [tokens, tokens])
        np.testing.assert_array_equal(dump.topk_counts_LDE.sum(axis=(1, 2)), [2 * tokens] * 2)
        np.testing.assert_allclose(dump.prob_sums_LDE.sum(axis=(1, 2)), [tokens] * 2, rtol=1e-6)
        assert (dump.tokens_LD > 0).all() and not dump.unlabelled_tokens_L.any()

    probe = run_pretrain(
        1,
        [
            "--out", str(probe_dir),
            *with_flag_values(TINY_MOE_GPT, eval_iters="2", split="50,50,0"),
            "--moe-edl-mock-domains", "3", "--load", str(ckpt),
        ],
        entry=("-m", "megatron_edl.probe", "--cpu"),
    )  # fmt: skip
    assert probe.returncode == 0 and probe.validations, probe.describe()
    (dump,) = load_run(probe_dir)
    assert (dump.source, dump.step, dump.num_iterations) == ("probe", 3, 0)
    np.testing.assert_array_equal(dump.tokens_LD.sum(axis=1), [2 * TOKENS_PER_ITERATION] * 2)
    printed = probe.validations[0]  # the first evaluation: the one the probe records
    for d, name in enumerate(DOMAINS):
        mean = dump.lm_loss_sums_D[d] / dump.lm_loss_tokens_D[d]
        assert mean == pytest.approx(printed[f"lm loss/{name}"], rel=1e-5)
        assert dump.lm_loss_tokens_D[d] == pytest.approx(printed[f"token share/{name}"], rel=1e-5)
    # Every evaluated token is in the loss here, so the routed and the loss token shares agree.
    np.testing.assert_allclose(
        dump.tokens_LD[0] / dump.tokens_LD[0].sum(), dump.lm_loss_tokens_D, rtol=1e-5
    )

    argv = ["--out", str(out), f"baseline={ckpt / 'routing_stats'}", f"probe={probe_dir}"]
    assert report.main(argv) == 0
    links = html_links(out / "index.html")
    assert "figures/lm_loss.png" in links and "figures/ternary_layer001.png" in links
    for link in links:
        assert (out / link).is_file(), link


def test_probe_reads_other_labels_than_a_windowed_run_trained_on(tmp_path):
    # The statistics window is sized by the training labels' domains (3 here); the probe reads
    # 5 and must still load the checkpoint (it builds its routers without the window).
    ckpt, probe_dir = tmp_path / "ckpt", tmp_path / "probe"
    window = ["--moe-edl-coeff", "0.05", "--moe-edl-window-decay", "0.9"]
    flags = [
        *TINY_MOE_GPT, "--moe-edl-mock-domains", "3", *window, "--train-iters", "3",
        "--save", str(ckpt), "--save-interval", "3",
    ]  # fmt: skip
    result = run_pretrain(1, flags)
    assert result.returncode == 0 and sorted(result.iterations) == [1, 2, 3], result.describe()
    probe = run_pretrain(
        1,
        [
            "--out", str(probe_dir),
            *with_flag_values(TINY_MOE_GPT, eval_iters="1", split="50,50,0"),
            "--moe-edl-mock-domains", "5", *window, "--load", str(ckpt),
        ],
        entry=("-m", "megatron_edl.probe", "--cpu"),
    )  # fmt: skip
    assert probe.returncode == 0 and probe.validations, probe.describe()
    (dump,) = load_run(probe_dir)
    assert dump.step == 3 and len(dump.domains) == 5
