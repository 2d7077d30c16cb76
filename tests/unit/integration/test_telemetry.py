"""Routing telemetry: the per-micro-batch sums, the router's recording, and the sharded reduction.

Sharded runs use Megatron's real ``AuxLossTopKRouter`` on gloo (2 ranks) under TP with and without
sequence parallelism and under DP, feed each rank the tokens it sees in Megatron, record two
training micro-batches (plus forwards that must not count) and dump through
:func:`megatron_edl.integration.telemetry.dump_routing_stats`. The expected dump is computed in
the parent, independently of Megatron's router: logits = hidden @ W^T, top-k by ``torch.topk``,
and :func:`routing_sums` over all tokens of the global micro-batches, once.

Shape legend: B samples, S sequence, s local sequence, H hidden, E experts, D domains, T tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_edl.analysis.routing_stats import load_run
from megatron_edl.core.routing_sums import routing_sums, unpack_routing_sums
from megatron_edl.integration import telemetry
from tests.helpers.distributed import count_all_reduce, run_distributed

NUM_EXPERTS = 4
NUM_DOMAINS = 3
HIDDEN = 8
TOPK = 2
SEQ = 8
MBS = 2
MICRO_BATCHES = 2

# ---------------------------------------------------------------------------------------------
# The per-micro-batch sums
# ---------------------------------------------------------------------------------------------


def test_routing_sums_hand_computed() -> None:
    # Token 0: domain 1, logits (0, 0) -> p = (1/2, 1/2), H = ln 2, top-1 = expert 0 (given).
    # Token 1: unlabelled, logits (ln 3, 0) -> p = (3/4, 1/4), top-1 = expert 0.
    # Token 2: domain 1, padding: left out.  Token 3: domain 0, logits (0, ln 3), top-1 = 1.
    logits_TE = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [5.0, 0.0], [0.0, math.log(3)]])
    routing_map_TE = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=torch.bool)
    sums_XF = routing_sums(
        logits_TE=logits_TE,
        routing_map_TE=routing_map_TE,
        domain_ids_T=torch.tensor([1, -1, 1, 0]),
        num_domains=2,
        padding_T=torch.tensor([False, False, True, False]),
    )
    h34 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    arrays = unpack_routing_sums(sums_XF[None].numpy(), 2)
    np.testing.assert_allclose(arrays["topk_counts_LDE"], [[[0, 1], [1, 0]]])
    np.testing.assert_allclose(arrays["prob_sums_LDE"], [[[0.25, 0.75], [0.5, 0.5]]], rtol=1e-6)
    np.testing.assert_allclose(arrays["tokens_LD"], [[1, 1]])
    np.testing.assert_allclose(arrays["entropy_sums_LD"], [[h34, math.log(2)]], rtol=1e-6)
    np.testing.assert_allclose(arrays["unlabelled_topk_counts_LE"], [[1, 0]])
    np.testing.assert_allclose(arrays["unlabelled_prob_sums_LE"], [[0.75, 0.25]], rtol=1e-6)
    np.testing.assert_allclose(arrays["unlabelled_tokens_L"], [1])
    np.testing.assert_allclose(arrays["unlabelled_entropy_sums_L"], [h34], rtol=1e-6)
    with pytest.raises(ValueError, match="packed sums must have shape"):
        unpack_routing_sums(sums_XF[None].numpy(), 3)


def test_router_stats_phases() -> None:
    train = telemetry.RouterStats(num_domains=2, phase="train")
    evaluation = telemetry.RouterStats(num_domains=2, phase="eval")
    modes = [(True, True), (True, False), (False, False), (False, True)]
    assert [train.counts_forward(training=t, grad_enabled=g) for t, g in modes] == [
        True, False, False, False,
    ]  # fmt: skip
    assert [evaluation.counts_forward(training=t, grad_enabled=g) for t, g in modes] == [
        False, False, True, True,
    ]  # fmt: skip
    silent = telemetry.RouterStats(num_domains=2, phase="train", records=False)
    silent.record(
        logits_TE=torch.zeros(3, 4),
        routing_map_TE=torch.ones(3, 4, dtype=torch.bool),
        domain_ids_T=torch.zeros(3, dtype=torch.long),
    )
    assert silent.num_forwards == 1
    assert not silent.take(4, torch.device("cpu")).any()  # zeros of shape (D+1, 2E+2)


def test_per_domain_lm_loss_from_megatrons_ratios() -> None:
    report = {
        "lm loss": 2.5, "lm loss/a": 2.0, "lm loss/b": 3.0, "token share/a": 0.5,
        "token share/b": 0.5, "lm loss/c": float("nan"), "token share/c": 0.0,
    }  # fmt: skip
    sums_D, tokens_D = telemetry.per_domain_lm_loss(report, ["a", "b", "c"])
    np.testing.assert_allclose(sums_D, [1.0, 1.5, 0.0])
    np.testing.assert_allclose(tokens_D, [0.5, 0.5, 0.0])
    assert telemetry.per_domain_lm_loss({"lm loss": 2.5}, ["a"]) is None
    assert telemetry.per_domain_lm_loss(None, ["a"]) is None


def test_token_shares_are_logged_without_a_ppl(monkeypatch, capsys) -> None:
    """Shares leave Megatron's validation line (which prints a PPL per entry) for a line of
    their own; the telemetry hook, wrapped inside, still reads them; the log parser joins
    both lines."""
    from megatron.training import training

    from megatron_edl.integration import gpt
    from tests.helpers.megatron_runs import parse_validations

    report = {"lm loss": torch.tensor(2.5), "lm loss/a": torch.tensor(2.0)}
    report["token share/a"] = torch.tensor(0.25)
    seen = []

    def evaluate(*args, **kwargs):  # stock evaluate, with the telemetry hook inside
        seen.append(telemetry.per_domain_lm_loss(report, ["a"]))
        return report, None, False

    monkeypatch.setattr(training, "evaluate", evaluate)
    gpt.install_share_logging()
    gpt.install_share_logging()  # once
    total_loss_dict, _, _ = training.evaluate(None, None, None)
    assert seen[0] is not None
    assert sorted(total_loss_dict) == ["lm loss", "lm loss/a"]
    line = capsys.readouterr().out
    assert line == " validation token shares | token share/a value: 2.500000E-01 |\n"
    megatron_line = " validation loss at iteration 5 on validation set | lm loss value: 2.5 |"
    assert parse_validations(line + megatron_line) == [{"lm loss": 2.5, "token share/a": 0.25}]


def test_flags_are_checked() -> None:
    import argparse

    from megatron_edl.config import telemetry as config_telemetry

    def args(**kw):
        base = dict(
            moe_edl_stats_interval=None, moe_edl_probe_dir=None, skip_train=False, eval_iters=0,
            save=None, tensorboard_dir=None, moe_edl_stats_dir=None,
        )  # fmt: skip
        return argparse.Namespace(**{**base, **kw})

    assert config_telemetry.telemetry_phase(args()) is None
    assert config_telemetry.telemetry_phase(args(moe_edl_stats_interval=5)) == "train"
    with pytest.raises(ValueError, match="--moe-edl-stats-interval must be >= 1"):
        config_telemetry.telemetry_phase(args(moe_edl_stats_interval=0))
    with pytest.raises(ValueError, match="needs --skip-train"):
        config_telemetry.telemetry_phase(args(moe_edl_probe_dir="p"))
    assert config_telemetry.telemetry_phase(
        args(moe_edl_probe_dir="p", skip_train=True, eval_iters=2)
    )
    with pytest.raises(ValueError, match="cannot be combined"):
        config_telemetry.telemetry_phase(args(moe_edl_stats_interval=1, moe_edl_probe_dir="p"))
    assert config_telemetry.stats_directory(args(save="ckpt")) == "ckpt/routing_stats"
    with pytest.raises(ValueError, match="--moe-edl-stats-dir, --save or --tensorboard-dir"):
        config_telemetry.stats_directory(args())


# ---------------------------------------------------------------------------------------------
# Sharded recording and reduction with Megatron's router (gloo)
# ---------------------------------------------------------------------------------------------

# name -> (tp, dp, sequence parallel, EDL loss coefficient)
LAYOUTS = {
    "tp2_sp": (2, 1, True, 0.0),
    "tp2_no_sp": (2, 1, False, 0.0),  # both TP ranks route the same tokens: count them once
    "dp2": (1, 2, False, 0.0),
    "dp2_with_edl_loss": (1, 2, False, 0.3),  # one label entry feeds the loss and the stats
}


def _batches(seed: int, dp: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(MICRO_BATCHES):
        ids_BS = torch.randint(-1, NUM_DOMAINS, (dp * MBS, SEQ), generator=gen)
        hidden_BSH = torch.randn(dp * MBS, SEQ, HIDDEN, generator=gen)
        hidden_BSH += 2.0 * ids_BS[..., None].clamp_min(0).float()  # domain-dependent routing
        out.append({"ids_BS": ids_BS, "hidden_BSH": hidden_BSH})
    return out


def _expected(weight_EH: torch.Tensor, batches: list[dict]) -> dict[str, np.ndarray]:
    total_XF = 0
    for batch in batches:
        hidden_TH = batch["hidden_BSH"].reshape(-1, HIDDEN)
        logits_TE = hidden_TH @ weight_EH.T
        top_TK = torch.topk(logits_TE, TOPK, dim=-1).indices
        map_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, top_TK, True)
        total_XF = total_XF + routing_sums(
            logits_TE=logits_TE, routing_map_TE=map_TE,
            domain_ids_T=batch["ids_BS"].reshape(-1), num_domains=NUM_DOMAINS,
        ).double()  # fmt: skip
    return unpack_routing_sums(total_XF[None].numpy(), NUM_EXPERTS)


def _make_router(tp: int, sequence_parallel: bool, coeff: float, weight_EH: torch.Tensor):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_edl.config import EDLConfig, EDLRunConfig, LabelsConfig, TelemetryConfig
    from megatron_edl.integration.router import AuxLossTopKRouter

    config = TransformerConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=NUM_EXPERTS,
        moe_router_topk=TOPK, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
        use_cpu_initialization=True, params_dtype=torch.float32, add_bias_linear=False,
    )  # fmt: skip
    router = AuxLossTopKRouter(
        config=config,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        run_config=EDLRunConfig(
            labels=LabelsConfig(num_domains=NUM_DOMAINS),
            edl=EDLConfig(coeff=coeff),
            telemetry=TelemetryConfig(phase="train"),
        ),
    )
    router.set_layer_number(2)
    with torch.no_grad():
        router.weight.copy_(weight_EH)
    return router.train()


def _run_layout(name: str, weight_EH, batches, out_dir) -> dict:
    from megatron.core import num_microbatches_calculator as nmbc
    from megatron.core import parallel_state

    from megatron_edl.integration.labels import push_labels, router_labels, routers_wanting_labels

    tp, dp, sequence_parallel, coeff = LAYOUTS[name]
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    nmbc.init_num_microbatches_calculator(
        0, None, global_batch_size=MICRO_BATCHES * MBS * dp, micro_batch_size=MBS,
        data_parallel_size=dp,
    )  # fmt: skip
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    router = _make_router(tp, sequence_parallel, coeff, weight_EH)
    forward_calls = []
    for batch in batches:
        rows = slice(dp_rank * MBS, (dp_rank + 1) * MBS)
        hidden_sBH = batch["hidden_BSH"][rows].transpose(0, 1)
        if sequence_parallel:
            hidden_sBH = hidden_sBH[tp_rank * SEQ // tp : (tp_rank + 1) * SEQ // tp]
        hidden_sBH = hidden_sBH.contiguous()
        ids_BS = batch["ids_BS"][rows]
        labels = router_labels(
            ids_BS, torch.ones_like(ids_BS, dtype=torch.float32),
            sequence_parallel=sequence_parallel, tp_rank=tp_rank, tp_size=tp,
        )  # fmt: skip
        push_labels(router, labels)
        with count_all_reduce() as calls:
            router(hidden_sBH)
        forward_calls.append(calls)
        with torch.no_grad():  # the no-grad pass of a checkpointed forward: neither counts
            assert not routers_wanting_labels(router)
            router(hidden_sBH)
        router.eval()  # evaluation during training: not a training statistic
        router(hidden_sBH)
        router.train()
    assert not router.label_queue, "labels left in the queue"
    with count_all_reduce() as dump_calls:
        path = telemetry.dump_routing_stats(
            [router], directory=out_dir, step=7, num_iterations=1, source="train",
            domains=("a", "b", "c"),
        )  # fmt: skip
    parallel_state.destroy_model_parallel()
    nmbc.destroy_num_microbatches_calculator()
    return {"path": path, "forward_calls": forward_calls, "dump_calls": dump_calls}


def _world_worker(rank: int, world_size: int, jobs: dict[str, tuple]) -> dict[str, dict]:
    from megatron_edl import cpu

    cpu.apply()
    return {name: _run_layout(name, *job) for name, job in jobs.items()}


def _weight() -> torch.Tensor:
    return torch.randn(NUM_EXPERTS, HIDDEN, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def layout_results(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """Every layout on 2 ranks, in one spawn (process start-up dominates the cost)."""
    jobs = {}
    for i, (name, (_, dp, _, _)) in enumerate(LAYOUTS.items()):
        jobs[name] = (_weight(), _batches(seed=i, dp=dp), str(tmp_path_factory.mktemp(name)))
    per_rank = run_distributed(_world_worker, 2, jobs, timeout_s=180)
    return {
        name: (Path(job[2]), [results[name] for results in per_rank], job[1])
        for name, job in jobs.items()
    }


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sharded_statistics_equal_one_process(name, layout_results) -> None:
    _, dp, _, coeff = LAYOUTS[name]
    out_dir, results, batches = layout_results[name]
    # Rank 0 of the tp_dp_cp group writes; one all-reduce of the packed sums per dump.
    assert [r["path"] is not None for r in results] == [True, False]
    for r in results:
        assert r["dump_calls"] == [(NUM_DOMAINS + 1) * (2 * NUM_EXPERTS + 2)]
        # No collective per micro-batch for the statistics; the EDL loss has its own one.
        assert r["forward_calls"] == [[] if coeff == 0 else [NUM_DOMAINS * (NUM_EXPERTS + 1)]] * 2
    (stats,) = load_run(out_dir)
    assert stats.layers == (2,) and stats.domains == ("a", "b", "c") and stats.topk == TOPK
    expected = _expected(_weight(), batches)
    for key, want in expected.items():
        np.testing.assert_allclose(getattr(stats, key), want, rtol=1e-5, atol=1e-5, err_msg=key)
    assert stats.tokens_LD.sum() + stats.unlabelled_tokens_L.sum() == dp * MBS * SEQ * 2


def test_expected_statistics_discriminate() -> None:
    """A double count or a lost micro-batch would change the reference."""
    batches = _batches(seed=1, dp=1)
    full = _expected(_weight(), batches)["tokens_LD"]
    one = _expected(_weight(), batches[:1])["tokens_LD"]
    assert not np.array_equal(full, one) and not np.array_equal(full, 2 * full)


# ---------------------------------------------------------------------------------------------
# Launcher wiring (parsed flags only; nothing is launched)
# ---------------------------------------------------------------------------------------------


def _parse(flags: list[str], monkeypatch):
    import sys

    from megatron.training.arguments import parse_args

    from megatron_edl.integration.install import extra_args_provider

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt", *flags])
    return parse_args(extra_args_provider)


def test_launcher_loads_labels_and_builds_recording_routers(tmp_path, monkeypatch) -> None:
    import types

    from megatron.training import training

    from megatron_edl.config.labels import label_reasons
    from megatron_edl.integration.install import install_edl
    from tests.helpers.megatron_runs import TINY_MOE_GPT

    # install_edl wraps two functions of Megatron's training module: restore them afterwards.
    for name in ("post_training_step_callbacks", "evaluate"):
        monkeypatch.setattr(training, name, getattr(training, name))
    flags = [*TINY_MOE_GPT, "--moe-edl-mock-domains", "3", "--moe-edl-stats-interval", "5"]
    args = _parse([*flags, "--moe-edl-stats-dir", str(tmp_path)], monkeypatch)
    assert label_reasons(args) == ["--moe-edl-stats-interval"]
    model_cfg = types.SimpleNamespace(transformer_layer_spec=None)
    install_edl(args, model_cfg, object(), object())
    assert not args.edl_config.enabled  # the loss stays off: labels for the telemetry only
    assert args.labels_config.domain_names == ("domain0", "domain1", "domain2")
    assert callable(model_cfg.transformer_layer_spec)  # the EDL router's spec provider
    hooks = training.post_training_step_callbacks._edl_telemetry
    assert hooks.writer.interval == 5 and hooks.writer.directory == str(tmp_path)

    probe = _parse([*TINY_MOE_GPT, "--moe-edl-probe-dir", str(tmp_path)], monkeypatch)
    with pytest.raises(ValueError, match="--skip-train"):
        install_edl(probe, types.SimpleNamespace(transformer_layer_spec=None), None, None)


def test_probe_command_line() -> None:
    from megatron_edl.probe import probe_argv

    argv = probe_argv("out", ["--load", "ckpt", "--eval-iters", "3"])
    assert argv == [
        "--load", "ckpt", "--eval-iters", "3", "--skip-train", "--no-load-optim",
        "--no-load-rng", "--train-iters", "1", "--moe-edl-window-decay", "0",
        "--moe-edl-probe-dir", "out",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="--load"):
        probe_argv("out", ["--eval-iters", "3"])
