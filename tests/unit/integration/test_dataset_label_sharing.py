"""Label resolution at launch: one rank per node reads the blend's files, the others get the
same labels, or the same error (``megatron_edl.integration.dataset.shared_per_node``)."""

from __future__ import annotations

import os

from tests.helpers.distributed import run_distributed
from tests.unit.test_pretrain_gpt import indexed

WORLD_SIZE = 3


def _resolve_on_every_rank(rank, world_size, prefixes):
    """``(files read here, loss ids by prefix or None, error or None)`` on one rank.

    The barrier stands for Megatron's ``init_process_group``, which every rank reaches after
    the launcher's label resolution: local rank 0 cannot exit (removing the shared file)
    before the others have read it.
    """
    import torch.distributed as dist

    from megatron_edl.integration import dataset

    reads = []
    read = dataset.read_sidecar_labels
    dataset.read_sidecar_labels = lambda prefix: (reads.append(prefix), read(prefix))[1]
    try:
        blend = dataset.resolve_blend_domains(prefixes, "sidecar", per_node=True)
        result = len(reads), {p: blend.loss_ids[p].tolist() for p in prefixes}, None
    except Exception as e:  # the same error is expected on every rank
        result = len(reads), None, f"{type(e).__name__}: {e}"
    dist.barrier()
    return result


def test_one_rank_per_node_reads_and_every_rank_gets_the_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the shared file (the ranks inherit it)
    (tmp_path / "tmp").mkdir()
    prefixes = []
    for name, labels in (("a", [0, 1, 2, 0, 1, 2]), ("b", [2, 2, 1, 1, 0, 0])):
        (tmp_path / name).mkdir()
        prefixes.append(indexed(tmp_path / name, labels))
    results = run_distributed(_resolve_on_every_rank, WORLD_SIZE, prefixes)
    assert [reads for reads, _, _ in results] == [2, 0, 0]  # local rank 0 only
    assert all(labels == results[0][1] for _, labels, _ in results)
    assert results[0][1][prefixes[1]] == [2, 2, 1, 1, 0, 0]

    # A damaged sidecar: the same error on every rank, none waits for ever.
    sidecar = f"{prefixes[1]}.domains"
    with open(sidecar, "r+b") as f:
        f.truncate(os.path.getsize(sidecar) - 4)
    results = run_distributed(_resolve_on_every_rank, WORLD_SIZE, prefixes, timeout_s=60)
    errors = [error for _, _, error in results]
    assert errors[0] is not None and "corpus.domains" in errors[0], errors
    assert errors == [errors[0]] * WORLD_SIZE
    assert [reads for reads, _, _ in results] == [2, 0, 0]
