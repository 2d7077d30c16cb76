"""tests/helpers/exact_losses.py: the comparison of two recordings (hand-made recordings)."""

from __future__ import annotations

import json

from tests.helpers import exact_losses


def _recording(lm_loss: str) -> dict:
    return {"dp2": {"1": {"lm loss": "6.94", "grad norm": "1.5"}, "2": {"lm loss": lm_loss}}}


def test_identical_recordings_have_no_difference(tmp_path, capsys):
    before, after = tmp_path / "a.json", tmp_path / "b.json"
    before.write_text(json.dumps(_recording("6.90")))
    after.write_text(json.dumps(_recording("6.90")))
    assert exact_losses.main(["compare", str(before), str(after)]) == 0
    assert capsys.readouterr().out.strip() == "1 cases, 3 logged values: 0 differences"


def test_every_difference_is_named(tmp_path, capsys):
    changed = _recording("6.91")
    changed["dp2"]["1"].pop("grad norm")
    changed["tp2_sp"] = {"1": {"lm loss": "7.0"}}
    assert exact_losses.compare(_recording("6.90"), changed) == [
        "dp2 iteration 1 grad norm: 1.5 -> None",
        "dp2 iteration 2 lm loss: 6.90 -> 6.91",
        "tp2_sp iteration 1 lm loss: None -> 7.0",
    ]
    before, after = tmp_path / "a.json", tmp_path / "b.json"
    before.write_text(json.dumps(_recording("6.90")))
    after.write_text(json.dumps(changed))
    assert exact_losses.main(["compare", str(before), str(after)]) == 1
    assert capsys.readouterr().out.splitlines()[-1].endswith(": 3 differences")
