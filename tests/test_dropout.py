"""LoRA's input dropout (training/dropout.py): the mask drawn from geometric gaps has nn.Dropout's distribution,
the layer computes what nn.Dropout computes for a given mask, and every LoRA layer of a medlora model uses it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import medlora.training.dropout as dropout_module
from medlora.training.dropout import LoraDropout, keep_mask


def check_bernoulli(mask: torch.Tensor, p: float) -> None:
    """Dropped share, its spread along the tensor and the share of dropped neighbour pairs, each within 5 standard
    deviations of independent Bernoulli(p) draws."""
    dropped = (~mask).flatten().double()
    n = dropped.numel()
    assert abs(dropped.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    for part in dropped.chunk(4):  # no region is favoured (the gaps restart where each round ends)
        assert abs(part.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / part.numel())
    pairs = (dropped[1:] * dropped[:-1]).mean().item()  # independent neighbours: p^2
    assert abs(pairs - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n) * 2


@pytest.mark.parametrize("p", [0.01, 0.05, 0.2, 0.5])
def test_keep_mask_is_bernoulli_and_seeded(p):
    torch.manual_seed(0)
    mask = keep_mask((700, 1500), p)
    assert mask.dtype == torch.bool and mask.shape == (700, 1500)
    check_bernoulli(mask, p)
    torch.manual_seed(0)
    assert torch.equal(keep_mask((700, 1500), p), mask)  # the run's seed decides it, as for every other draw
    assert keep_mask((3, 0), p).shape == (3, 0) and keep_mask((5,), 0.0).all()


def test_keep_mask_over_several_rounds_of_gaps(monkeypatch):
    """When a round of gaps ends before the tensor does, the next round starts after the last dropped position:
    forced here with rounds of about a tenth of the gaps needed."""
    monkeypatch.setattr(dropout_module, "GAPS_MARGIN", 0.1)
    torch.manual_seed(1)
    check_bernoulli(keep_mask((400, 1000), 0.05), 0.05)


@pytest.mark.parametrize("p", [0.1, 0.5])  # dropped positions only / a bool mask
def test_lora_dropout_computes_what_nn_dropout_computes(p):
    torch.manual_seed(0)
    x = torch.randn(4, 30, 64, dtype=torch.float64).transpose(1, 2).requires_grad_(True)  # not contiguous
    drop = LoraDropout(p)
    assert isinstance(drop, nn.Dropout) and drop.p == p
    torch.manual_seed(5)
    y = drop(x)
    torch.manual_seed(5)
    kept = keep_mask(x.shape, p)  # the same draw, in the same (row-major) order
    assert 0 < (~kept).sum() < kept.sum()
    assert torch.equal(y, torch.where(kept, x * (1 / (1 - p)), 0.0))  # kept elements scaled by 1/(1-p), the rest 0
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, torch.where(kept, grad * (1 / (1 - p)), 0.0))
    drop.eval()
    assert drop(x) is x and LoraDropout(0.0).train()(x) is x


def test_every_lora_layer_of_a_medlora_model_uses_it(tiny_model_dir):
    from peft.utils import get_peft_model_state_dict

    from medlora.config import TrainConfig
    from medlora.model import load_model
    from medlora.training.recipe import apply_lora

    model, _ = apply_lora(TrainConfig(lora_dropout=0.05), load_model(str(tiny_model_dir), False))
    drops = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
             for d in m.lora_dropout.values()]
    assert len(drops) == 14 and all(type(d) is LoraDropout and d.p == 0.05 for d in drops)
    assert not any("dropout" in k for k in get_peft_model_state_dict(model))
    # p = 0: PEFT's Identity stays
    model, _ = apply_lora(TrainConfig(lora_dropout=0.0), load_model(str(tiny_model_dir), False))
    assert not any(isinstance(m, LoraDropout) for m in model.modules())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_product_added_in_place_trains_as_peft_does(tiny_model_dir, precision):
    """add_lora_in_place (every precision's training forward): same loss, gradients and random stream as PEFT's
    own LoRA forward with dropout on; under bf16 autocast LoRA's input stays bf16 (the same products up to
    rounding)."""
    from medlora.config import TrainConfig
    from medlora.model import load_model
    from medlora.training.lighter import add_lora_in_place
    from medlora.training.recipe import apply_lora

    models = []
    for in_place in (False, True):
        torch.manual_seed(0)  # LoRA A's initialisation
        base = load_model(str(tiny_model_dir), False)
        model, _ = apply_lora(TrainConfig(lora_dropout=0.1), base.to(torch.bfloat16) if precision == "bf16" else base)
        if in_place:
            assert add_lora_in_place(model) == 14 and add_lora_in_place(model) == 0  # once only
        for name, param in model.named_parameters():  # a non-zero B, so that every path carries a gradient
            if "lora_B" in name:
                torch.manual_seed(len(name))
                nn.init.normal_(param, std=0.05)
        models.append(model.train())
    batch = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(3))
    results = []
    for model in models:
        torch.manual_seed(4)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads, torch.rand(3)))
    (loss0, grads0, rng0), (loss1, grads1, rng1) = results
    tol = 1e-5 if precision == "fp32" else 2e-2
    assert loss1 == pytest.approx(loss0, rel=tol) and torch.equal(rng0, rng1)
    assert grads0.keys() == grads1.keys() and len(grads1) == 28
    assert all(((grads1[n] - grads0[n]).norm() / grads0[n].norm()).item() < 10 * tol for n in grads0)
