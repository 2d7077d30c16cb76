"""Checking the checkpoint a run resumes from, before Megatron builds the model and loads it.

Megatron writes ``latest_checkpointed_iteration.txt`` (the *tracker*) in the ``--save`` folder
only after a checkpoint is complete, so a run killed while saving resumes from the previous
checkpoint: the half-written ``iter_N`` folder is ignored. What the tracker names can still be
damaged afterwards (a file truncated by a full disk, a partial copy, files deleted by hand);
Megatron then fails deep inside ``torch.distributed.checkpoint`` with an ``EOFError``
traceback. :func:`check_resume_checkpoint` refuses such a checkpoint with one line instead.

Checked, for the ``torch_dist`` format (Megatron's default): the folder the tracker (or
``--ckpt-step``) names exists and holds ``metadata.json`` and ``.metadata`` (the PyTorch
distributed-checkpoint index), the index can be read, and every file it lists is at least as
long as the byte ranges it lists in it (``offset + length``). Contents are not hashed. Global
rank 0 checks, alone.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "TRACKER",
    "CheckpointError",
    "check_resume_checkpoint",
    "check_window_state",
    "resume_checkpoint_dir",
]

TRACKER = "latest_checkpointed_iteration.txt"
"""Megatron's tracker file: the iteration (or ``release``) of the latest complete checkpoint."""


class CheckpointError(ValueError):
    """The checkpoint to resume from is missing, incomplete or damaged (names the file)."""


def resume_checkpoint_dir(load: str | os.PathLike, ckpt_step: int | None = None) -> Path | None:
    """The folder Megatron loads for ``--load`` (and ``--ckpt-step``), or ``None`` for none.

    Args:
        load: The ``--load`` folder.
        ckpt_step: ``--ckpt-step``: load this iteration instead of the tracker's.

    Returns:
        ``load/iter_NNNNNNN`` (or ``load/release``); ``None`` without a tracker (Megatron then
        starts from scratch).

    Raises:
        CheckpointError: if the tracker is unreadable.
    """
    load = Path(load)
    if ckpt_step is not None:
        return load / f"iter_{ckpt_step:07d}"
    tracker = load / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return load / "release"
    if not text.isdigit():
        raise CheckpointError(f"--load {load}: {tracker} holds {text!r}, not an iteration")
    return load / f"iter_{int(text):07d}"


def _folder_to_check(args) -> Path | None:
    """The ``torch_dist`` checkpoint folder ``--load`` resumes from, on global rank 0 only.

    One rank reads the index and stats the shards (thousands of ranks would be a metadata storm on
    the shared file system); its refusal ends the job (srun --kill-on-bad-exit, torchrun), and
    every rank loads the checkpoint through Megatron afterwards anyway. ``None``: nothing to check
    here (no ``--load``, another format, another rank, no tracker).
    """
    load = getattr(args, "load", None)
    if not load or getattr(args, "ckpt_format", "torch_dist") != "torch_dist":
        return None
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return resume_checkpoint_dir(load, getattr(args, "ckpt_step", None))


def check_resume_checkpoint(args) -> None:
    """Refuse a damaged ``torch_dist`` checkpoint under ``--load`` (module docstring).

    Args:
        args: Megatron's parsed arguments (``load``, ``ckpt_step``, ``ckpt_format``).

    Raises:
        CheckpointError: naming the folder or file and what is wrong with it.
    """
    folder = _folder_to_check(args)
    if folder is None:
        return
    load = args.load
    hint = "(truncated or half-written: restore it, or remove it and point the tracker at an "
    hint += "earlier iteration)"
    if not folder.is_dir():
        raise CheckpointError(f"--load {load}: checkpoint folder {folder} does not exist")
    for name in ("metadata.json", ".metadata"):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: no {name} {hint}")
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # a truncated pickle: EOFError, UnpicklingError, ...
        raise CheckpointError(
            f"checkpoint {folder}: .metadata is unreadable ({type(e).__name__}) {hint}"
        ) from e
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for relative_path, end in sorted(needed.items()):
        path = folder / relative_path
        size = path.stat().st_size if path.is_file() else None
        if size is None or size < end:
            what = "is missing" if size is None else f"has {size} bytes, its index needs {end}"
            raise CheckpointError(f"checkpoint {folder} is incomplete: {path.name} {what} {hint}")


def check_window_state(
    args, buffer_name: str, *, num_domains: int | None = None, num_experts: int | None = None
) -> None:
    """Refuse resuming an EDL run with the statistics window from a checkpoint without its state,
    or with the state of another number of loss domains.

    A checkpoint written without ``--moe-edl-window-decay`` (a stock run, or EDL without the
    window) has no ``<router>.{buffer_name}`` entries. Megatron's default
    ``--dist-ckpt-strictness assume_ok_unexpected`` would fail inside the loader; with
    ``log_unexpected`` (Megatron's own option) it logs the absent entries and the window starts
    empty. The window is packed ``[D * E + D]`` (the last dimension of its global shape): a
    checkpoint written with another number of loss domains D (another label map, other data)
    would fail with a shape mismatch inside the loader, after the model is built. Both say so in
    one line, before the model is built. Global rank 0 reads the index.

    Args:
        args: Megatron's parsed arguments (``load``, ``ckpt_step``, ``ckpt_format``,
            ``dist_ckpt_strictness``).
        buffer_name: The router buffer holding the window.
        num_domains: The run's loss domains D (``None``: the size is not checked).
        num_experts: The model's routed experts E (``--num-experts``).

    Raises:
        CheckpointError: naming the checkpoint and the flag that lets it load.
    """
    folder = _folder_to_check(args)
    if folder is None or not (folder / ".metadata").is_file():
        return
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    windows = {key: meta for key, meta in keys.items() if key.endswith(f".{buffer_name}")}
    if num_domains is not None and num_experts:
        for key, meta in windows.items():
            size = int(meta.size[-1]) if getattr(meta, "size", None) else None
            if size is not None and size != num_domains * (num_experts + 1):
                held = f"{size // (num_experts + 1)}" if size % (num_experts + 1) == 0 else "?"
                raise CheckpointError(
                    f"checkpoint {folder} holds an EDL window ({key}) of {held} loss domains x "
                    f"{num_experts} experts, this run has {num_domains} loss domains: resume "
                    "with the labels it was trained with (the same --moe-edl-label-map and "
                    "data), or without --moe-edl-window-decay"
                )
    if getattr(args, "dist_ckpt_strictness", "assume_ok_unexpected") != "assume_ok_unexpected":
        return
    if not windows:
        raise CheckpointError(
            f"checkpoint {folder} holds no EDL window state (written without "
            "--moe-edl-window-decay): add --dist-ckpt-strictness log_unexpected to load it "
            "and start the window empty"
        )
