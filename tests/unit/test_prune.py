"""megatron-edl-prune's refusals of a bad ``--export`` request: one line, before any work."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from megatron_edl import prune

MODEL = ["--num-experts", "4", "--moe-router-topk", "2", "--mock-data"]


def _refusal(capsys, tmp_path, *argv: str) -> str:
    out = tmp_path / "out"
    flags = ["--load", str(tmp_path / "ckpt"), "--moe-edl-eval-per-domain", *MODEL]
    with pytest.raises(SystemExit) as exit_info:
        prune.main(["--out", str(out), *argv, "--", "--cpu", *flags])
    assert exit_info.value.code == 2
    assert not out.exists()  # refused before any pass (and before the output folder)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--export", "code"], "--export code needs one --keep M (experts to keep)"),
        (["--export", "code", "--keep", "4", "2"], "needs one --keep M (experts to keep), got "
         "--keep 4 2"),
        (["--export", "code", "--keep", "1"], "--keep 1: below the router's top-k (2)"),
        (["--export", "code", "--keep", "5"], "--keep 5: above the model's number of experts (4)"),
        (["--export-dir", "x"], "--export-dir x: pass --export DOMAIN with it"),
        (["--export", "code", "--keep", "2", "--", "--moe-router-group-topk", "1"],
         "--export with --moe-router-group-topk 1: group-limited routing"),
        (["--export", "code", "--keep", "2", "--", "--moe-expert-capacity-factor", "1.0"],
         "--export with --moe-expert-capacity-factor 1.0: token dropping"),
        (["--export", "code", "--keep", "2", "--", "--moe-router-load-balancing-type",
          "sinkhorn"], "--export with --moe-router-load-balancing-type sinkhorn"),
        (["--", "--moe-router-enable-expert-bias"],
         "--moe-router-enable-expert-bias: the expert bias is added after the score function"),
    ],
)  # fmt: skip
def test_bad_export_requests_are_one_line_errors(capsys, tmp_path, argv, message):
    line = _refusal(capsys, tmp_path, *argv)
    assert line.startswith("error: ") and message in line, line


def test_an_existing_non_empty_export_dir_is_refused_and_left_alone(capsys, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    line = _refusal(
        capsys, tmp_path, "--export", "code", "--keep", "2", "--export-dir", str(folder)
    )
    assert line == f"error: --export-dir {folder} exists and is not empty: nothing is overwritten"
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]


def _stats(domains=("code", "prose")):
    # 2 layers, 2 domains, 4 experts: code ranks 3 > 1 > 0 > 2 in layer 1, 0 > 2 > 3 > 1 in 2
    mass_LDE = np.array(
        [[[2.0, 5.0, 1.0, 9.0], [9.0, 1.0, 1.0, 1.0]], [[9.0, 1.0, 5.0, 2.0], [1.0, 1.0, 1.0, 9.0]]]
    )
    return SimpleNamespace(
        domains=domains, layers=(1, 2), num_experts=4, topk=2, prob_sums_LDE=mass_LDE
    )


def test_build_export_keeps_the_domain_rankings_first_m_and_refuses_an_unknown_domain():
    spec = prune.build_export(_stats(), "code", 2)
    assert spec["kept"] == {"1": [1, 3], "2": [0, 2]}  # ascending original id
    assert (spec["domain_index"], spec["keep"], spec["num_experts"]) == (0, 2, 4)
    with pytest.raises(prune.PruneError) as err:
        prune.build_export(_stats(), "maths", 2)
    assert str(err.value) == "--export maths: not a domain of the run's labels (code, prose)"
