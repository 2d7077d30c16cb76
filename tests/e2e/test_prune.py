"""megatron-edl-prune end to end on a trained tiny MoE: m = E is the probe's evaluation, and the
export (``--export DOMAIN --keep M``) is a stock M-expert checkpoint with the masked loss."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_edl.benchmarks.runs import parse_validations
from tests.helpers.data_helpers import write_labelled_prefix
from tests.helpers.megatron_runs import LAYOUTS, TINY_MOE_GPT, run_pretrain, with_flag_values

# Loss resolution of the comparison with stock Megatron's printed validation loss (7 significant
# digits: 5e-7 absolute, about 7e-8 relative) plus float32 rounding of the sliced router's
# smaller matmul; well below the m = M vs m = E difference the test also asserts.
EXPORT_REL_TOL = 1e-6

pytestmark = pytest.mark.slow

DOMAINS = ("domain0", "domain1", "domain2")


def test_prune_full_model_equals_the_probe_and_curves_are_written(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "prune"
    flags = [
        *TINY_MOE_GPT, "--moe-edl-mock-domains", "3", "--train-iters", "3",
        "--save", str(ckpt), "--save-interval", "3", *LAYOUTS["ep2_alltoall"],
    ]  # fmt: skip
    trained = run_pretrain(2, flags)
    assert trained.returncode == 0, trained.describe()
    probe_flags = [
        *with_flag_values(TINY_MOE_GPT, eval_iters="2", split="50,50,0"),
        "--moe-edl-mock-domains", "3", "--moe-edl-eval-per-domain", "--load", str(ckpt),
    ]  # fmt: skip
    command = [sys.executable, "-m", "megatron_edl.prune", "--out", str(out), "--seed", "3"]
    result = subprocess.run(
        [*command, "--", "--cpu", *probe_flags], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "prune.json").read_text())
    # The calibration pass is the probe on the same (mock) batches: its printed per-domain
    # losses are the masked evaluation's full-model entry.
    printed = parse_validations((out / "calibration.log").read_text())[0]
    for name in DOMAINS:
        assert summary["full"]["lm_loss_per_domain"][name] == pytest.approx(
            printed[f"lm loss/{name}"], rel=1e-5
        )
    assert [r["name"] for r in summary["results"]] == [
        "full-m4",
        "domain-m2",
        "global-m2",
        "random-m2",
    ]  # fmt: skip  (TINY_MOE_GPT: 4 experts, top-2: m = 4, 2)
    for ranking in ("domain", "global", "random"):
        (point,) = summary["curves"][ranking]
        assert point["keep"] == 2 and point["mean_increase"] is not None
    assert (out / "prune.png").stat().st_size > 0 and "| 2 |" in (out / "prune.md").read_text()

    bad = subprocess.run(
        [*command, "--keep", "1", "--", "--cpu", *probe_flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --keep 1: below the router's top-k (2)"]


def test_export_loads_in_stock_megatron_and_gives_the_masked_evaluations_loss(tmp_path):
    """Train on three labelled domains, export "code" with M = E/2 = 2 experts per layer, and
    evaluate the export with stock Megatron (no megatron-edl flag, --num-experts 2) on the same
    validation data: code documents only, so every token of every context routes as "code" in
    the masked evaluation too (docs/method.md section 6)."""
    names = {"code": 0, "prose": 1, "math": 2}
    train, valid = tmp_path / "train", tmp_path / "valid"
    write_labelled_prefix(train, [i % 3 for i in range(300)], names, seed=0)
    write_labelled_prefix(valid, [0] * 120, names, seed=1)
    model = [f for f in with_flag_values(TINY_MOE_GPT, eval_iters="2") if f != "--mock-data"]
    del model[model.index("--split") : model.index("--split") + 2]  # per-split data paths
    model += [
        "--train-data-path", str(train), "--valid-data-path", str(valid),
        "--data-cache-path", str(tmp_path / "cache"),
    ]  # fmt: skip
    ckpt, out, export = tmp_path / "ckpt", tmp_path / "prune", tmp_path / "export"
    edl = ["--moe-edl-coeff", "0.1"]
    trained = run_pretrain(
        1, [*model, *edl, "--train-iters", "3", "--save", str(ckpt), "--save-interval", "3"]
    )
    assert trained.returncode == 0 and sorted(trained.iterations) == [1, 2, 3], trained.describe()

    command = [
        sys.executable, "-m", "megatron_edl.prune", "--out", str(out), "--keep", "2",
        "--rankings", "domain", "--export", "code", "--export-dir", str(export),
        "--", "--cpu", *model, *edl, "--moe-edl-eval-per-domain", "--load", str(ckpt),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "prune.json").read_text())
    sidecar = json.loads((export / "export.json").read_text())
    assert (sidecar["domain"], sidecar["keep"], sidecar["num_experts"]) == ("code", 2, 4)
    assert sidecar["source_iteration"] == 3 and sidecar["source_checkpoint"] == str(ckpt)
    order = summary["orders"]["domain"]  # the masked evaluation's ranking, per layer and domain
    assert sidecar["kept_experts"] == {layer: sorted(o[0][:2]) for layer, o in order.items()}
    masked = next(r for r in summary["results"] if r["name"] == "domain-m2")
    assert masked["lm_loss_per_domain"]["code"] == sidecar["masked_evaluation"]["lm_loss_domain"]
    assert masked["lm_loss"] == masked["lm_loss_per_domain"]["code"]  # code tokens only
    assert not list(tmp_path.glob(".export.tmp-*"))  # renamed, nothing left behind

    stock = run_pretrain(
        1,
        [
            *with_flag_values(model, num_experts="2"), "--load", str(export),
            "--skip-train", "--train-iters", "1",
            "--no-load-rng",  # CPU: Megatron cannot restore a CUDA RNG state (any checkpoint)
        ],
    )  # fmt: skip
    assert "validation loss at iteration 3 on validation set" in stock.log, stock.describe()
    (validation,) = stock.validations
    got, want = validation["lm loss"], masked["lm_loss_per_domain"]["code"]
    assert got == pytest.approx(want, rel=EXPORT_REL_TOL)
    # The comparison can tell the experts apart: keeping all 4 gives another loss.
    full = summary["full"]["lm_loss_per_domain"]["code"]
    assert abs(full - want) > 20 * EXPORT_REL_TOL * want
