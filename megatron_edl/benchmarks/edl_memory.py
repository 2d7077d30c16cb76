"""Peak memory of the EDL loss of one layer, forward and backward, with many loss domains.

The pairwise JSD of ``megatron_edl.core.edl.edl_loss`` compares every pair of domain means; in
one pass over all D rows it forms ``(D, D, E)`` intermediates, which grow with the square of the
number of domains whether or not they are present. Above ``PAIRWISE_BLOCK_ELEMENTS`` it keeps
only the M present rows and works in row blocks (docs/BENCHMARKS.md section 2).
:func:`peak_memory` measures what one call costs: ``edl_loss`` plus its backward on statistics
of D domains of which M are present, in a fresh process (so nothing earlier is counted), after
a warm-up call on three domains, as the growth of the process's peak resident set (Linux
``VmHWM``, reset through ``/proc/self/clear_refs`` after the inputs are built; ``ru_maxrss``
where that is refused). CPU only; the child serves every large block by ``mmap``
(``MALLOC_MMAP_THRESHOLD_``), so the peak resident set follows the peak of live tensors.
``tools/benchmark_edl_memory.py`` prints the table of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

__all__ = ["MemoryPoint", "peak_memory"]

_CHILD = """
import json, re, resource, sys
import torch
from megatron_edl.core import edl

def status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\\s+(\\d+)", f.read()).group(1))  # KiB

domains, experts, present, block_elements = (int(v) for v in sys.argv[1:5])
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
sums_DE = torch.rand(domains, experts, generator=gen, dtype=torch.float32)
counts_D = torch.zeros(domains)
counts_D[torch.randperm(domains, generator=gen)[:present]] = 1.0
sums_DE = (sums_DE * counts_D[:, None]).requires_grad_(True)
warm_DE = torch.rand(3, experts, requires_grad=True)  # first calls load code: not counted
edl.edl_loss(sums_DE=warm_DE, counts_D=torch.ones(3), block_elements=1).loss.backward()
edl.edl_loss(sums_DE=warm_DE, counts_D=torch.ones(3)).loss.backward()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base, peak = status("VmRSS"), lambda: status("VmHWM")
except OSError:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = edl.edl_loss(  # as the router calls it (edl_fused.edl_step): no (D, D) matrix
    sums_DE=sums_DE, counts_D=counts_D, block_elements=block_elements, with_matrix=False
)
out.loss.backward()
print(json.dumps({"peak_kib": max(0, peak() - base), "loss": float(out.loss),
                  "present": int(out.num_present)}))
"""


@dataclasses.dataclass(frozen=True)
class MemoryPoint:
    """One measurement of :func:`peak_memory`."""

    domains: int
    experts: int
    present: int
    block_elements: int
    peak_mib: float
    """Growth of the peak resident set during ``edl_loss`` and its backward (MiB)."""
    loss: float

    @property
    def dense_mib(self) -> float:
        """Size of one fp32 ``(D, D, E)`` tensor, the unit of the one-pass form (MiB)."""
        return self.domains**2 * self.experts * 4 / 2**20


def peak_memory(
    domains: int,
    experts: int,
    present: int,
    *,
    block_elements: int | None = None,
    timeout_s: float = 300,
) -> MemoryPoint:
    """Peak memory of ``edl_loss`` forward and backward, measured in a fresh process.

    Args:
        domains: D, the loss domains (rows of the statistics).
        experts: E.
        present: M, the domains with tokens (n_j > 0), chosen at random.
        block_elements: ``edl_loss``'s ``block_elements`` (default: the library's); a value of
            at least ``D * D * E`` forces the one-pass form over all D rows (the first
            version's memory).
        timeout_s: Limit of the child process.

    Returns:
        The measurement.

    Raises:
        subprocess.CalledProcessError: If the child fails (its stderr is attached).
        subprocess.TimeoutExpired: If it runs longer than ``timeout_s``.
    """
    if block_elements is None:
        from megatron_edl.core.edl import PAIRWISE_BLOCK_ELEMENTS

        block_elements = PAIRWISE_BLOCK_ELEMENTS
    args = [str(v) for v in (domains, experts, present, block_elements)]
    # glibc serves every block of 128 KiB or more by mmap and unmaps it when freed (no dynamic
    # threshold, no heap trim delay), so the resident set follows the live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return MemoryPoint(
        domains=domains,
        experts=experts,
        present=result["present"],
        block_elements=block_elements,
        peak_mib=result["peak_kib"] / 1024,
        loss=result["loss"],
    )
