"""The answer-only training loss, with the LM head run on answer positions only.

The plain path computes logits for every position (seq x 151,936 fp32 values for Qwen2.5, ~15% of the
FLOPs) and then ignores the prompt's. transformers' causal LMs accept a boolean ``logits_to_keep`` mask and
project only those positions; the loss is the same token-summed cross-entropy divided by
``num_items_in_batch`` that the model's own loss function uses, so the numbers match the reference recipe.

Even so, the answer tokens' logits (tokens x vocab, 175 MB for 288 answer tokens of Qwen2.5) are the largest
tensors of a step, and they are alive when every activation is (the end of the forward pass, the start of the
backward pass): ``F.cross_entropy`` keeps a log-softmax copy of them for its backward pass, whose backward then
allocates two more. :class:`_SummedCrossEntropy` keeps the logits themselves and turns them into their own
gradient in place, so one tokens x vocab tensor is alive instead of three. Written here because PyTorch has no
such loss, and the fused-linear cross-entropy kernels that do this job (Liger, Cut Cross-Entropy) are Triton
(GPU) code.
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


_LSE_ROWS = 32  # logsumexp over row blocks: its temporary is 32 x vocab, not tokens x vocab


class _SummedCrossEntropy(torch.autograd.Function):
    """sum_i (logsumexp(logits_i) - logits_i[target_i]) over 2-D fp32 logits, F.cross_entropy(reduction='sum')
    up to float rounding. Saves the logits tensor (no copy) and overwrites it in its backward pass with
    softmax - onehot, the gradient, so the logits must not be used after ``backward`` (they are a temporary of
    :func:`answer_only_loss`), and the graph cannot be run backward twice."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.cat([torch.logsumexp(block, dim=1) for block in logits.split(_LSE_ROWS)])
        picked = logits.gather(1, targets[:, None]).squeeze(1)
        ctx.save_for_backward(logits, lse, targets)
        ctx.spent = False
        return (lse - picked).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.spent:
            raise RuntimeError("the answer-only loss's backward pass overwrites its logits: it runs once")
        ctx.spent = True
        logits, lse, targets = ctx.saved_tensors
        probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
        probs.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
        return probs.mul_(grad), None


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(logits, targets, reduction='sum') for fp32 2-D logits and valid targets, keeping one
    tokens x vocab tensor alive instead of three (:class:`_SummedCrossEntropy`). ``logits`` is consumed."""
    if not logits.requires_grad or logits.dtype != torch.float32:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    return _SummedCrossEntropy.apply(logits, targets)


def answer_only_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Token-summed cross-entropy over the answer tokens, divided by ``num_items_in_batch`` (the answer
    tokens of the whole accumulated batch, as the Trainer passes it) or by this micro-batch's count."""
    labels = inputs["labels"]
    keep = answer_positions(labels)
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep)
    logits = outputs.logits.float()  # (answer tokens in the batch, vocab)
    if logits.dim() == 3:  # a model that ignored the mask scored every position
        logits = logits[keep]
    loss = summed_cross_entropy(logits, labels[:, 1:][keep[:, :-1]])
    n = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return loss / (n.to(loss.device) if torch.is_tensor(n) else n)
