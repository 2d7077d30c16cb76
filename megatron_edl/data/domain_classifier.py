"""Domain labels from a local Hugging Face text classifier (``--domain-classifier DIR``).

For teams that already run a topic or domain classifier in their curation pipeline. The folder
holds a model that ``transformers.AutoModelForSequenceClassification`` loads and its tokenizer
(``AutoTokenizer``), as written by ``save_pretrained``; nothing is downloaded
(``local_files_only=True``). The label of a document is the name, in the model config's
``id2label``, of its highest-scoring class; those names are the label vocabulary (id = class id).
Preprocessing workers each load the model once and classify the first json key's text in batches
(``--classifier-batch-size``), cut to ``--classifier-max-length`` tokens, on
``--classifier-device`` (``cpu`` by default; ``cuda`` for a GPU).

Usage:
    python tools/preprocess_data.py --input 'corpus/*.jsonl.gz' --output-prefix data/c \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model ./tokenizer --append-eod \\
        --domain-classifier ./topic_classifier --classifier-device cuda --workers 2

Shape legend (suffixes of tensor names):
    B  documents of a batch
    C  classes
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from megatron_edl.data.errors import DataError
from megatron_edl.data.vocabulary import label_name_problem

__all__ = ["TextClassifier", "classifier_label_names"]


def classifier_label_names(model_dir: str) -> list[str]:
    """The class names of the model's ``config.json`` (``id2label``), in class id order.

    Raises:
        DataError: naming the folder, if it has no readable config, the ids are not
            0..C-1, or a name cannot be a label name.
    """
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            id2label = json.load(f).get("id2label")
    except (OSError, ValueError) as e:
        raise DataError(f"--domain-classifier {model_dir}: cannot read {path}: {e}") from e
    if not isinstance(id2label, dict) or not id2label:
        raise DataError(f"--domain-classifier {model_dir}: {path} has no id2label")
    try:
        by_id = {int(k): v for k, v in id2label.items()}
    except ValueError as e:
        raise DataError(f"--domain-classifier {model_dir}: id2label ids: {e}") from e
    if sorted(by_id) != list(range(len(by_id))):
        raise DataError(
            f"--domain-classifier {model_dir}: id2label ids must be 0..{len(by_id) - 1}, "
            f"got {sorted(by_id)}"
        )
    names = [by_id[i] for i in range(len(by_id))]
    for name in names:
        problem = label_name_problem(name)
        if problem is not None:
            raise DataError(f"--domain-classifier {model_dir}: id2label name {name!r} {problem}")
    if len(set(names)) != len(names):
        raise DataError(f"--domain-classifier {model_dir}: id2label repeats a name")
    return names


class TextClassifier:
    """``texts -> class names``: the model, batched, without gradients.

    Args:
        model_dir: The model folder (model and tokenizer).
        device: Torch device for the model.
        batch_size: Documents per forward pass.
        max_length: Tokens read per document.
    """

    def __init__(self, model_dir: str, device: str, batch_size: int, max_length: int) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.names = classifier_label_names(model_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, local_files_only=True
            )
        except (OSError, ValueError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"--domain-classifier {model_dir}: cannot load: {message}") from e
        try:
            self.device = torch.device(device)
            self.model = model.to(self.device).eval()
        except (RuntimeError, AssertionError) as e:
            raise DataError(f"--classifier-device {device!r}: {e}") from e
        if self.model.config.num_labels != len(self.names):
            raise DataError(
                f"--domain-classifier {model_dir}: {self.model.config.num_labels} outputs for "
                f"{len(self.names)} id2label names"
            )
        self.batch_size = batch_size
        self.max_length = max_length
        self._torch = torch

    def __call__(self, texts: Sequence[str]) -> list[str]:
        """The class name of each text."""
        out: list[str] = []
        with self._torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch: Any = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    truncation=True,
                    max_length=self.max_length,
                    padding=True,
                    return_tensors="pt",
                ).to(self.device)
                logits_BC = self.model(**batch).logits
                out.extend(self.names[i] for i in logits_BC.argmax(dim=-1).tolist())
        return out
