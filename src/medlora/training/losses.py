"""The answer-only training loss, with the LM head run on answer positions only.

The plain path computes logits for every position (seq x 151,936 fp32 values for Qwen2.5, ~15% of the
FLOPs) and then ignores the prompt's. transformers' causal LMs accept a boolean ``logits_to_keep`` mask and
project only those positions; the loss is the same token-summed cross-entropy divided by
``num_items_in_batch`` that the model's own loss function uses, so the numbers match the reference recipe.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX


def accepts_logits_to_keep(model) -> bool:
    """Models from before transformers 4.50 (or custom code) lack the argument: they get the plain loss."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the positions whose *next* token is an answer token (position p predicts p + 1)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def answer_only_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Token-summed cross-entropy over the answer tokens, divided by ``num_items_in_batch`` (the answer
    tokens of the whole accumulated batch, as the Trainer passes it) or by this micro-batch's count."""
    labels = inputs["labels"]
    keep = answer_positions(labels)
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep)
    logits = outputs.logits.float()  # (answer tokens in the batch, vocab)
    if logits.dim() == 3:  # a model that ignored the mask scored every position
        logits = logits[keep]
    loss = F.cross_entropy(logits, labels[:, 1:][keep[:, :-1]], reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return loss / (n.to(loss.device) if torch.is_tensor(n) else n)
