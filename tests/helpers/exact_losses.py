"""The exact-loss check of a restructuring: every logged number of a few layouts, before and after.

A change that must not change behaviour (a refactor, a move of config fields) is checked by
training the tiny model with every megatron-edl loss on (EDL with window and warm-up, variance,
orthogonality, per-domain evaluation) on five layouts for 6 iterations, before and after, and
comparing every number Megatron logs (losses, grad norms, EDL metrics; timings excluded) as the
printed text, i.e. bit for bit as far as the log shows. About 4 minutes on 2 cores::

    git stash / git checkout BASE
    python -m tests.helpers.exact_losses record before.json
    git checkout -                      # the change
    python -m tests.helpers.exact_losses record after.json
    python -m tests.helpers.exact_losses compare before.json after.json   # exit 1 on any difference
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tests.helpers.megatron_runs import LAYOUTS, TINY_MOE_GPT, run_pretrain, with_flag_values

ITERATIONS = 6
EDL_FLAGS = (
    "--moe-edl-coeff 0.05 --moe-edl-window-decay 0.9 --moe-edl-warmup-iters 2 "
    "--moe-variance-loss-coeff 0.1 --moe-ortho-loss-coeff 0.1 --moe-edl-eval-per-domain"
).split()
RECOMPUTE = "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1"
CASES: dict[str, tuple[int, list[str]]] = {
    "single": (1, []),
    "dp2": (2, LAYOUTS["dp2"]),
    "tp2_sp": (2, LAYOUTS["tp2_sp"]),
    "pp2_recompute": (2, [*LAYOUTS["pp2"], *RECOMPUTE.split()]),
    "ep2_alltoall": (2, LAYOUTS["ep2_alltoall"]),
}
# Wall-clock numbers differ between any two runs; Megatron's parameter-count line is printed by
# another rank while the iteration line is written and sometimes lands inside it in the log.
_UNSTABLE = ("time", "throughput", "number of parameters")  # case-insensitive


def record(cases: dict[str, tuple[int, list[str]]] = CASES) -> dict[str, dict[str, dict]]:
    """``{case: {iteration: {metric: printed value}}}`` of one run per case."""
    base = with_flag_values(TINY_MOE_GPT, global_batch_size="8")
    out: dict[str, dict[str, dict]] = {}
    for name, (nproc, flags) in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            result = run_pretrain(
                nproc, [*base, "--train-iters", str(ITERATIONS), *EDL_FLAGS, *flags], cwd=tmp
            )
        if sorted(result.iterations) != list(range(1, ITERATIONS + 1)):
            raise RuntimeError(f"case {name}: not every iteration logged\n{result.describe()}")
        out[name] = {
            str(step): {key: repr(value) for key, value in metrics.items()}
            for step, metrics in result.iterations.items()
        }
    return _stable(out)


def _stable(recording: dict) -> dict:
    """The recording without the unstable keys (recordings written before a key was added)."""
    return {
        case: {
            step: {k: v for k, v in metrics.items() if not any(w in k.lower() for w in _UNSTABLE)}
            for step, metrics in steps.items()
        }
        for case, steps in recording.items()
    }


def compare(before: dict, after: dict) -> list[str]:
    """Every difference, one line each (empty: identical)."""
    lines = []
    for case in sorted(set(before) | set(after)):
        steps_a, steps_b = before.get(case, {}), after.get(case, {})
        for step in sorted(set(steps_a) | set(steps_b), key=int):
            a, b = steps_a.get(step, {}), steps_b.get(step, {})
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    lines.append(f"{case} iteration {step} {key}: {a.get(key)} -> {b.get(key)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("record").add_argument("out", type=Path)
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        args.out.write_text(json.dumps(record(), indent=1, sort_keys=True) + "\n")
        return 0
    before, after = (_stable(json.loads(p.read_text())) for p in (args.before, args.after))
    differences = compare(before, after)
    values = sum(len(m) for steps in before.values() for m in steps.values())
    for line in differences:
        print(line)
    print(f"{len(before)} cases, {values} logged values: {len(differences)} differences")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
