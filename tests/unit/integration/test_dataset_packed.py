"""Domain labels with packed (THD) sequences: ``--dataloader-inter-document-masking`` and ``--sft``.

The labels must reach every router with its own tokens. ``get_batch`` is run on gloo ranks with
Megatron's real arguments, TP broadcast, packed-sequence flattening and CP split: the domain id
of a token is a function of the token, so after every step the labels of each rank must equal
that function of the tokens the rank holds (and the CP ranks together must hold every token once).
The per-document CP split of ``--sft`` uses Transformer Engine's ``thd_get_partitioned_indices``,
absent on CPU: the test installs a reference of its documented partition (each document cut in
``2 * cp`` chunks, CP rank r takes chunks r and 2cp-1-r); whatever index TE computes, the test's
invariant (labels follow tokens) is what ``get_batch`` must keep.

The THD attention itself needs Transformer Engine, so the training loop with packed sequences
runs only in the GPU-marked test at the end.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.megatron_runs import TINY_MOE_GPT, run_pretrain

MBS, SEQ = 2, 16
# Per sample: document boundaries (every document a multiple of 2 * CP = 4 tokens).
DOCS = ([0, 4, 12, 16], [0, 8, 16])
NUM_DOMAINS = 5


def _domain_of(tokens):
    return tokens % NUM_DOMAINS


def _weight_of(tokens):
    return tokens.float() / 10


def _loader_batch() -> dict[str, torch.Tensor]:
    """One micro-batch as Megatron's collate gives it (padded cu_seqlens per sample)."""
    tokens_BS = 100 + torch.arange(MBS * SEQ).view(MBS, SEQ)
    cu_seqlens = torch.full((MBS, SEQ + 1), SEQ, dtype=torch.int32)
    position_ids = torch.empty(MBS, SEQ, dtype=torch.int64)
    for b, docs in enumerate(DOCS):
        cu_seqlens[b, : len(docs)] = torch.tensor(docs, dtype=torch.int32)
        for start, end in zip(docs[:-1], docs[1:], strict=True):
            position_ids[b, start:end] = torch.arange(end - start)
    return {
        "tokens": tokens_BS,
        "labels": tokens_BS + 1,
        "loss_mask": torch.ones(MBS, SEQ),
        "position_ids": position_ids,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": torch.tensor([8, 8], dtype=torch.int32),
        "domain_ids": _domain_of(tokens_BS),
        "edl_weights": _weight_of(tokens_BS),
    }


def _thd_partitioned_indices(cu_seqlens, total_tokens, cp_size, cp_rank):
    """Reference of TE's ``thd_get_partitioned_indices`` (per-document zig-zag)."""
    index = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        chunk = (end - start) // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            index.extend(range(start + c * chunk, start + (c + 1) * chunk))
    assert bounds[-1] == total_tokens
    return torch.tensor(index, dtype=torch.int64)


def _get_batch_worker(rank: int, world_size: int, flags: list[str], sft_modes: tuple[bool, ...]):
    """``get_batch`` on one loader batch, once per SFT mode; what each call returned."""
    from megatron_edl import cpu

    cpu.apply()
    from megatron.core import parallel_state
    from megatron.core import utils as core_utils
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_args

    from megatron_edl.cpu import argv_with_cpu_flags
    from megatron_edl.integration import gpt
    from megatron_edl.integration.install import extra_args_provider, run_config_from_args

    sys.argv = ["pretrain_gpt", *argv_with_cpu_flags(flags)]
    args = parse_args(extra_args_provider)
    validate_args(args, {"tokenizer_type": "NullTokenizer"})
    run = run_config_from_args(args)
    args.edl_config, args.labels_config = run.edl, run.labels
    assert args.labels_config is not None
    steps = gpt.LabelledSteps(args=args, edl=run.edl, labels=run.labels)
    set_args(args)
    core_utils.tex = SimpleNamespace(thd_get_partitioned_indices=_thd_partitioned_indices)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
    )
    outs = []
    for sft in sft_modes:
        args.sft = sft  # get_batch's only SFT switch: the per-document CP split
        batch = steps.get_batch(iter([_loader_batch()]))
        keys = ("tokens", "labels", "domain_ids", "edl_weights", "cu_seqlens")
        outs.append(
            {
                "pp": parallel_state.get_pipeline_model_parallel_rank(),
                "cp": parallel_state.get_context_parallel_rank(),
                **{k: batch[k] for k in keys},
            }
        )
    parallel_state.destroy_model_parallel()
    return outs


def _flags(*layout: str) -> list[str]:
    return [
        *TINY_MOE_GPT,
        "--moe-edl-coeff", "0.1", "--moe-edl-mock-domains", str(NUM_DOMAINS),
        "--micro-batch-size", str(MBS), "--seq-length", str(SEQ),
        "--max-position-embeddings", str(SEQ),
        "--dataloader-inter-document-masking", *layout,
    ]  # fmt: skip


SFT_MODES = (False, True)


@pytest.fixture(scope="module")
def tp2_cp2_batches():
    """Per SFT mode, what ``get_batch`` returned on each of the 4 ranks (TP=2+SP x CP=2)."""
    layout = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    layout += ["--context-parallel-size", "2"]
    per_rank = run_distributed(_get_batch_worker, 4, _flags(*layout), SFT_MODES, timeout_s=180)
    return {sft: [outs[i] for outs in per_rank] for i, sft in enumerate(SFT_MODES)}


@pytest.mark.parametrize("sft", SFT_MODES, ids=["inter_document", "sft_per_document"])
def test_labels_follow_tokens_through_tp_broadcast_flatten_and_cp_split(sft, tp2_cp2_batches):
    results = tp2_cp2_batches[sft]
    held = {}
    for r in results:
        tokens, ids, weights = r["tokens"], r["domain_ids"], r["edl_weights"]
        # Flattened to one packed sequence, halved by CP.
        assert tokens.shape == ids.shape == weights.shape == (1, MBS * SEQ // 2), r
        torch.testing.assert_close(ids, _domain_of(tokens), rtol=0, atol=0)
        torch.testing.assert_close(weights, _weight_of(tokens), rtol=0, atol=0)
        assert r["cu_seqlens"].tolist() == [[0, 4, 12, 16, 24, 32]]
        held.setdefault(r["cp"], []).append(tokens)
    # TP ranks of one CP rank hold the same tokens; the CP ranks together hold each token once.
    for per_tp in held.values():
        assert all(torch.equal(t, per_tp[0]) for t in per_tp)
    together = torch.cat([held[cp][0].reshape(-1) for cp in sorted(held)])
    assert sorted(together.tolist()) == list(range(100, 100 + MBS * SEQ))
    if sft:  # per document: every document is split, so CP rank 0 has both ends of each
        assert held[0][0].reshape(-1)[:2].tolist() == [100, 103]
    else:  # per sequence: the flat sequence in 4 chunks, rank 0 has chunks 0 and 3
        assert held[0][0].reshape(-1)[:9].tolist() == [*range(100, 108), 124]


def test_intermediate_pipeline_stage_gets_packed_labels():
    """PP=3: the middle stage gets no tokens, only THD metadata, and (with EDL) the labels."""
    results = run_distributed(
        _get_batch_worker,
        3,
        [*_flags("--pipeline-model-parallel-size", "3"), "--num-layers", "3"],
        (False,),
        timeout_s=180,
    )
    want_ids = _domain_of(100 + torch.arange(MBS * SEQ)).view(1, -1)
    for (r,) in results:
        torch.testing.assert_close(r["domain_ids"], want_ids, rtol=0, atol=0)
        assert r["cu_seqlens"].tolist() == [[0, 4, 12, 16, 24, 32]]
        if r["pp"] == 1:
            assert r["tokens"] is None and r["labels"] is None


# ---------------------------------------------------------------------------------------------
# The datasets with packed sequences
# ---------------------------------------------------------------------------------------------


def test_inter_document_masking_labels_match_document_boundaries():
    """With ``inter_document_masking``, each ``cu_seqlens`` segment is one document: one domain."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.tokenizers import MegatronTokenizer

    from megatron_edl.config import LabelsConfig
    from megatron_edl.integration.dataset import (
        DomainGPTDatasetConfig,
        DomainMockGPTDataset,
        mock_document_domains,
    )

    tokenizer = MegatronTokenizer.from_pretrained(
        metadata_path={"library": "null-text"}, vocab_size=512
    )
    cfg = LabelsConfig(num_domains=3)
    config = DomainGPTDatasetConfig(
        random_seed=1,
        sequence_length=64,
        split="1,0,0",
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        tokenizer=tokenizer,
        inter_document_masking=True,
        mid_level_dataset_surplus=0.005,
        edl_num_domains=3,
        edl_document_domains=mock_document_domains(3, cfg),
    )
    (train, _, _) = BlendedMegatronDatasetBuilder(
        DomainMockGPTDataset, [20, None, None], lambda: True, config
    ).build()
    multi = 0
    for i in range(20):
        sample = train[i]
        cu = sample["cu_seqlens"].tolist()
        cu = cu[: cu.index(64) + 1]
        multi += len(cu) > 2
        ids, weights = sample["domain_ids"], sample["edl_weights"]
        for start, end in zip(cu[:-1], cu[1:], strict=True):
            segment = ids[start:end]
            assert (segment == segment[0]).all(), (i, cu, ids)
            # Segment weighting: each document's tokens weigh 1 / its token count in the sample.
            torch.testing.assert_close(weights[start:end].sum(), torch.tensor(1.0))
            # Mock documents draw their tokens from their domain's vocabulary band.
            band = (tokenizer.vocab_size - 2) // 3
            body = sample["tokens"][start:end][sample["tokens"][start:end] != tokenizer.eod]
            assert ((body - 1) // band == segment[0]).all()
    assert multi > 0, "no sample spans two documents; the test checks nothing"


class _ChatTokenizer:
    """The part of Megatron's SFT tokenizer ``SFTDataset`` uses: a token per message word."""

    eod, pad, vocab_size = 1, 0, 64
    unique_identifiers = {"class": "_ChatTokenizer"}

    def tokenize_conversation(self, conversation, return_target, add_generation_prompt):
        tokens = [2]  # conversation start
        targets = [-100]
        for message in conversation:
            words = [3 + len(w) for w in message["content"].split()]
            tokens += words
            targets += words if message["role"] == "assistant" else [-100] * len(words)
        return np.array(tokens + [self.eod]), np.array(targets + [self.eod])


def _conversation(n_words: int) -> list[dict]:
    text = " ".join("w" * (1 + i % 4) for i in range(n_words))
    return [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": text},
        {"role": "assistant", "content": text},
    ]


def _write_jsonl(path, lines) -> str:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in lines))
    return str(path)


def _read_jsonl(path: str) -> list[list[dict]]:
    with open(path) as f:
        return [json.loads(line)["messages"] for line in f]


def _sft_config(tmp_path, files: dict[str, str], seq: int, cp: int = 1, weights=None):
    from megatron_edl.config import LabelsConfig
    from megatron_edl.integration.dataset import DomainGPTDatasetConfig

    yaml_path = tmp_path / "domains.yaml"
    yaml_path.write_text("".join(f"{path}: {name}\n" for path, name in files.items()))
    return DomainGPTDatasetConfig(
        random_seed=1,
        sequence_length=seq,
        blend=(list(files), weights),
        split="1,0,0",
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        tokenizer=_ChatTokenizer(),
        create_attention_mask=False,  # SFT's packing has none
        context_parallel_size=cp,
        edl_labels=LabelsConfig(num_domains=2),
        edl_domains_per_prefix=str(yaml_path),
    )


@pytest.mark.parametrize("cp", [1, 2])
def test_sft_samples_label_conversations_and_leave_padding_unlabelled(tmp_path, cp):
    """``DomainSFTDataset`` on a JSONL file per domain: Megatron's SFT packing plus labels."""
    from megatron_edl.integration.dataset import DomainSFTDataset

    code = _write_jsonl(tmp_path / "code.jsonl", [[*_conversation(3), *_conversation(5)]] * 4)
    chat = _write_jsonl(tmp_path / "chat.jsonl", [_conversation(7)] * 4)
    config = _sft_config(tmp_path, {code: "code", chat: "chat"}, seq=48, cp=cp)
    for path, domain in ((code, 0), (chat, 1)):
        rows = _read_jsonl(path)
        dataset = DomainSFTDataset(rows, path, np.arange(4), 4, _split_train(), config)
        sample = dataset[0]
        tokens, ids, weights = sample["tokens"], sample["domain_ids"], sample["edl_weights"]
        pad_S = tokens == _ChatTokenizer.pad
        assert pad_S.any(), "the sample has no padding; the test checks nothing"
        assert (ids[pad_S] == -1).all() and (weights[pad_S] == 0).all()
        assert (ids[~pad_S] == domain).all()
        cu = sample["cu_seqlens"].tolist()
        cu = cu[: cu.index(48) + 1]
        for start, end in zip(cu[:-1], cu[1:], strict=True):  # one unit of weight per conversation
            torch.testing.assert_close(weights[start:end].sum(), torch.tensor(1.0))
        assert len(cu) - 1 == (2 if domain == 0 else 1)


def _split_train():
    from megatron.core.datasets.utils import Split

    return Split.train


def test_sft_blend_through_megatrons_builder_and_jsonl_reader(tmp_path, monkeypatch):
    """Two JSONL files, one domain each, through ``BlendedMegatronDatasetBuilder`` and Megatron's
    JSONL reader (``datasets``): every sample's tokens carry the domain of the file it came from.
    """
    pytest.importorskip("datasets", reason="Megatron's SFT reader needs the datasets package")
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )

    from megatron_edl.integration.dataset import DomainSFTDataset

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code = _write_jsonl(tmp_path / "code.jsonl", [_conversation(3 + i) for i in range(6)])
    chat = _write_jsonl(tmp_path / "chat.jsonl", [_conversation(9 + i) for i in range(5)])
    config = _sft_config(tmp_path, {code: "code", chat: "chat"}, seq=32, weights=[1.0, 1.0])
    (train, _, _) = BlendedMegatronDatasetBuilder(
        DomainSFTDataset, [16, 0, 0], lambda: True, config
    ).build()
    seen = set()
    for i in range(16):
        sample = train[i]
        ids = sample["domain_ids"][sample["tokens"] != _ChatTokenizer.pad]
        assert (ids == sample["dataset_id"]).all(), (i, sample["dataset_id"], ids)
        seen.add(int(sample["dataset_id"]))
    assert seen == {0, 1}


def test_sft_label_count_mismatch_names_the_file(tmp_path):
    from megatron_edl.data.sidecar import SidecarMismatchError
    from megatron_edl.integration.dataset import DomainSFTDataset

    code = _write_jsonl(tmp_path / "code.jsonl", [_conversation(3)] * 3)
    config = _sft_config(tmp_path, {code: "code"}, seq=32)
    rows = _read_jsonl(code)[:2]  # the reader saw 2 of the 3 lines
    with pytest.raises(SidecarMismatchError, match="code.jsonl: 3 domain labels for 2 sequences"):
        DomainSFTDataset(rows, code, np.arange(2), 2, _split_train(), config)


def test_launcher_accepts_packed_sequences_and_names_what_it_refuses(tmp_path, monkeypatch):
    from megatron_edl.config import EDLConfigError
    from megatron_edl.integration.install import run_config_from_args
    from tests.unit.test_yaml_config import megatron_args

    base = [*TINY_MOE_GPT, "--moe-edl-coeff", "0.1", "--moe-edl-mock-domains", "3"]
    args = megatron_args([*base, "--dataloader-inter-document-masking"], monkeypatch)
    assert run_config_from_args(args).labels.num_domains == 3
    args = megatron_args([*base, "--sft"], monkeypatch)
    with pytest.raises(EDLConfigError, match="--sft need --moe-edl-domains-per-prefix"):
        run_config_from_args(args)
    # SFT with one domain per JSONL file: the domains come from the per-prefix file.
    code = _write_jsonl(tmp_path / "code.jsonl", [_conversation(3)] * 3)
    chat = _write_jsonl(tmp_path / "chat.jsonl", [_conversation(4)] * 2)
    (tmp_path / "domains.yaml").write_text(f"{code}: code\n{chat}: chat\n")
    real_data = [flag for flag in TINY_MOE_GPT if flag != "--mock-data"]
    args = megatron_args(
        [*real_data, "--moe-edl-coeff", "0.1", "--sft", "--data-path", code, chat,
         "--moe-edl-domains-per-prefix", str(tmp_path / "domains.yaml")],
        monkeypatch,
    )  # fmt: skip
    cfg = run_config_from_args(args).labels
    assert (cfg.num_domains, cfg.domain_names) == (2, ("code", "chat"))
    args = megatron_args(base, monkeypatch)
    args.hybrid_context_parallel = True
    with pytest.raises(EDLConfigError, match="--hybrid-context-parallel"):
        run_config_from_args(args)


@pytest.mark.gpu
def test_inter_document_masking_trains_with_edl_on_gpu(tmp_path):
    """Real THD attention (Transformer Engine): EDL on with packed sequences trains, DP=1."""
    pytest.importorskip("transformer_engine")
    flags = [
        *TINY_MOE_GPT, "--moe-edl-coeff", "0.1", "--moe-edl-mock-domains", "3",
        "--dataloader-inter-document-masking", "--transformer-impl", "transformer_engine",
        "--train-iters", "3",
    ]  # fmt: skip
    result = run_pretrain(
        1, flags, entry=("-m", "megatron_edl.pretrain_gpt"), env={"CUDA_VISIBLE_DEVICES": "0"}
    )
    assert result.returncode == 0, result.describe()
    assert sorted(result.iterations) == [1, 2, 3], result.describe()
    assert all(m["edl_domains"] == 3.0 for m in result.iterations.values()), result.describe()
