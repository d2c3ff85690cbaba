"""Lighter activations: the same arithmetic as PEFT's LoRA layers (every precision: :func:`add_lora_in_place`)
and, for `--precision int8`, a SwiGLU MLP over int8 base layers (training/int8.py), with fewer tensors kept for
the backward pass and fewer temporaries.

Memory: the int8 weights take ~2 bytes per weight instead of 4 (the tied embedding and LM head 1 byte), and
:func:`lighten_activations` keeps fewer activations and allocates fewer temporaries. Measured on the
Qwen2.5-1.5B architecture (one 411-token step after a 227- and a 176-token one, 2-core Zen 3, glibc): the step
peaked at 9.97 GB without it, 7.4 GB with the lighter dropout and MLP, 6.34 GB with the in-place LoRA sum as
well, 5.56 GB (21.8 s instead of 25.6) once the embedding and head were int8 rows and the loss stopped copying
the logits (training/losses.py). On jemalloc, which `medlora train --precision int8` runs on where the system has it
(medlora/allocator.py, measurements there), the same step peaked at 4.76 GB in 20.4 s. Giving glibc's freed
blocks back to the OS instead (measured at the 7.4 GB stage) cost more time than int8 saves: every block
mmapped from 128 KB (``mallopt``) peaked at 5.2 GB but the step took 34 s instead of 23 s (4.7 million page
faults per step); with huge pages 30.6 s; mmapping only during the forward pass 5.9 GB and 25.5 s; a pool that
copies the saved activations out of the heap 7.8 GB.

Later, on a 2-core Zen 4 (train_speed benchmark, `--only medlora_int8`, jemalloc; the peak is the 411-token step,
at the end of its forward pass, when every saved activation and the answer tokens' logits are alive): 4.71 GB with
the saved activations at 890 MB; 4.57 GB once the RMSNorms kept their output instead of their input (751 MB);
4.35 GB once gate and up were kept in int8 groups instead of bf16 (:func:`_pack_mlp_input`; ~560 MB).
"""

from __future__ import annotations

import math
import types

import numpy as np
import torch
from torch import nn

from .dropout import keep_mask
from .int8 import Int8Linear, quantize_weight_rows


class _DropoutMatmul(torch.autograd.Function):
    """a = dropout(x) @ A^T (LoRA's A with its input dropout), saving x and the dropout mask as bits instead of the
    dropped fp32 copy of x and the fp32 dropout noise (x itself is kept anyway: q/k/v share it). The mask is drawn
    as medlora's :class:`~.dropout.LoraDropout` draws it (the same random stream), so the masks and results are
    those of PEFT's ``lora_A(dropout(x))``, up to float rounding (the 1/(1-p) factor is applied to the rank-r
    side)."""

    @staticmethod
    def forward(ctx, x, weight, p):
        keep = _keep_value(p, x.dtype)
        mask = keep_mask(x.shape, p)  # LoraDropout's draw: the same random stream
        out = nn.functional.linear(torch.where(mask, x, 0.0), weight).mul_(keep)
        ctx.save_for_backward(x, weight, _pack_bits(mask), keep)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bits, keep = ctx.saved_tensors
        mask = _unpack_bits(bits, x.shape)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(mask, grad_out @ (weight * keep), 0.0)
        if ctx.needs_input_grad[1]:
            dropped = torch.where(mask, x, 0.0)
            grad_w = (grad_out.reshape(-1, grad_out.shape[-1]).t() @ dropped.reshape(-1, x.shape[-1])).mul_(keep)
        return grad_x, grad_w, None


def _keep_value(p: float, dtype: torch.dtype) -> torch.Tensor:
    """1 / (1 - p) as nn.Dropout computes it on a CPU (a division in the activations' dtype)."""
    return torch.ones((), dtype=dtype).div_(1 - p)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.numpy()))  # 8 mask values per byte


def _unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    flat = np.unpackbits(bits.numpy(), count=math.prod(shape))  # uint8 0/1: a valid bool buffer
    return torch.from_numpy(flat).view(torch.bool).view(shape)


class DropoutLoraA(nn.Linear):
    """LoRA's A matrix with its input dropout folded in (:class:`_DropoutMatmul`). The module's only parameter is
    the original A (same tensor, same name in the state dict), and PEFT's dropout module becomes an Identity."""

    def __init__(self, lora_a: nn.Linear, p: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.p = lora_a.in_features, lora_a.out_features, p
        self.weight = lora_a.weight
        self.register_parameter("bias", lora_a.bias)
        self.train(lora_a.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.p > 0 and self.bias is None:
            return _DropoutMatmul.apply(x, self.weight, self.p)
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dropout={self.p}"


# how gate and up are kept for the MLP's backward pass: "int8" (below), "bf16" or "fp32"
SAVE_MLP_INPUTS = "int8"
_GROUP = 64  # values per int8 scale


def _pack_mlp_input(t: torch.Tensor):
    """A tokens x intermediate MLP activation as SAVE_MLP_INPUTS keeps it. "int8": symmetric int8 in groups of 64
    consecutive values, one fp32 scale per group (1.06 bytes a value instead of bf16's 2: on the Qwen2.5-1.5B
    architecture, 206 MB less for a 411-token step). Measured on 411 x 8960 Gaussian values, 2 Zen 4 cores, on
    jemalloc as int8 trains: 2.0-2.7 ms to pack against 0.3 ms for the bf16 conversion, 0.8-1.2 ms to unpack
    against 0.9-1.0 (so ~0.1 s more for the 56 tensors of a 6.7 s step, within the benchmark's run-to-run spread);
    relative error 0.62% against bf16's 0.17%. Groups keep an outlier's coarse steps to its own 64 values. Either
    rounding is far below the ~2-3% the int8 backward's own quantisation of these gradients carries (its rows are
    quantised to 8 bits right after). Rows whose length is not a multiple of 64 are kept in bf16."""
    if SAVE_MLP_INPUTS == "fp32":
        return t, None
    if SAVE_MLP_INPUTS == "bf16" or t.shape[-1] % _GROUP:
        return t.to(torch.bfloat16), None
    return quantize_weight_rows(t.reshape(-1, _GROUP), 127)  # a group is a row of int8's weight quantisation


def _unpack_mlp_input(values: torch.Tensor, scale: torch.Tensor | None, shape, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return values.to(dtype)
    return values.to(dtype).mul_(scale[:, None]).view(shape)


class _SwiGLUDownA(torch.autograd.Function):
    """(h, a) = (silu(gate) * up, dropout(h) @ A^T): a SwiGLU MLP's product and the LoRA A projection of down_proj's
    input, saving only gate and up (in 8 bits, see :func:`_pack_mlp_input`) and the dropout mask as bits. Autograd would
    keep gate, silu(gate), up, the dropout noise and the dropped copy of h: five fp32 tensors of the intermediate
    size per token. h feeds the int8 down projection, which saves nothing. The backward recomputes silu(gate)."""

    @staticmethod
    def forward(ctx, gate, up, weight, p):
        h = nn.functional.silu(gate).mul_(up)
        keep = bits = None
        if p > 0:
            keep = _keep_value(p, h.dtype)
            mask = keep_mask(h.shape, p)
            a = nn.functional.linear(torch.where(mask, h, 0.0), weight).mul_(keep)
            bits = _pack_bits(mask)
        else:
            a = nn.functional.linear(h, weight)
        ctx.dtype, ctx.shape = gate.dtype, gate.shape
        ctx.save_for_backward(*_pack_mlp_input(gate), *_pack_mlp_input(up), weight, bits, keep)
        return h, a

    @staticmethod
    def backward(ctx, grad_h, grad_a):
        gate, gate_scale, up, up_scale, weight, bits, keep = ctx.saved_tensors
        gate = _unpack_mlp_input(gate, gate_scale, ctx.shape, ctx.dtype)
        up = _unpack_mlp_input(up, up_scale, ctx.shape, ctx.dtype)
        mask = None if bits is None else _unpack_bits(bits, gate.shape)
        silu = nn.functional.silu(gate)
        grad_w = None
        if ctx.needs_input_grad[2]:
            dropped = silu * up if mask is None else torch.where(mask, silu, 0.0).mul_(up)
            grad_w = grad_a.reshape(-1, grad_a.shape[-1]).t() @ dropped.reshape(-1, dropped.shape[-1])
            if keep is not None:
                grad_w.mul_(keep)
            del dropped
        if mask is None:
            grad = grad_a @ weight
        else:
            grad = torch.where(mask, grad_a @ (weight * keep), 0.0)
        if grad_h is not None:
            grad.add_(grad_h)
        grad_up = grad * silu if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad.mul_(up), gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, grad_w, None


class _RMSNormSavingOutput(torch.autograd.Function):
    """y = w * x * rsqrt(mean(x^2) + eps): an RMSNorm with a frozen weight w, with the arithmetic of transformers'
    Llama/Qwen2 RMSNorm (the same fp32 operations in the same order, so the same bits), keeping its output y
    and the per-token rsqrt for the backward pass instead of its input x. y is kept anyway: the LoRA A
    projections it feeds (:class:`DropoutLoraA`, one y shared by q/k/v, another by gate/up) save it, and the
    backward pass recovers x * rsqrt = y / w. The input x is a residual-stream tensor that nothing else keeps,
    so two tokens x hidden fp32 tensors per decoder layer are freed: 141 MB of a 411-token step of the
    Qwen2.5-1.5B architecture (saved activations 890 -> 751 MB)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(y, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, rstd, weight = ctx.saved_tensors
        normed, scaled = y / weight, grad * weight  # x * rsqrt, and the gradient at it
        # d/dx of x * rsqrt(mean(x^2) + eps): rsqrt * (g - x_hat * mean(g * x_hat)), with x_hat = x * rsqrt
        return scaled.sub_(normed * (scaled * normed).mean(-1, keepdim=True)).mul_(rstd), None, None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x * rstd), rstd


def _light_rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """An RMSNorm through :class:`_RMSNormSavingOutput` while training on fp32 input; its own forward otherwise."""
    if self.training and torch.is_grad_enabled() and x.dtype == torch.float32 and x.requires_grad:
        return _RMSNormSavingOutput.apply(x, self.weight, _norm_eps(self))
    return type(self).forward(self, x)


def _norm_eps(module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return eps if isinstance(eps, float) else None


def _is_plain_rms_norm(module) -> bool:
    """A frozen fp32 RMSNorm whose forward is y = w * x * rsqrt(mean(x^2) + eps), bit for bit (checked on a
    random input, so variants such as Gemma's (1 + w) keep their own forward), with no zero in w (the backward
    pass divides by it)."""
    weight, eps = getattr(module, "weight", None), _norm_eps(module)
    if (not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, nn.Parameter) or eps is None
            or weight.dim() != 1 or weight.dtype != torch.float32 or weight.requires_grad
            or not bool((weight != 0).all())):
        return False
    x = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        return torch.equal(module(x), _rms_norm(x, weight, eps)[0])


def _plain_lora_adapter(layer) -> str | None:
    """The adapter name when ``layer`` (a PEFT LoRA Linear over an nn.Linear or an Int8Linear) runs exactly one
    vanilla LoRA adapter right now (not merged, not disabled, no DoRA or other variant), else None."""
    if (type(getattr(layer, "base_layer", None)) not in (nn.Linear, Int8Linear) or layer.disable_adapters
            or layer.merged):
        return None
    names = [n for n in layer.active_adapters if n in layer.lora_A]
    if len(names) != 1 or names[0] in getattr(layer, "lora_variant", {}):
        return None
    if layer.lora_A[names[0]].bias is not None or layer.lora_B[names[0]].bias is not None:
        return None
    return names[0]


def _add_lora_product(out: torch.Tensor, a: torch.Tensor, lora_b: nn.Linear, scaling: float) -> torch.Tensor:
    """out += scaling * a @ B^T in place (one ``addmm_``), instead of PEFT's ``out + lora_B(a) * scaling``, which
    allocates three more tensors of the output's size (B's output, its scaled copy, the sum). Under bf16 autocast
    the product runs in bf16, as PEFT's does there."""
    b = lora_b.weight.t()
    out.view(-1, out.shape[-1]).addmm_(a.reshape(-1, a.shape[-1]).to(out.dtype), b.to(out.dtype), alpha=scaling)
    return out


def _light_swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A SwiGLU MLP's forward (``down(silu(gate(x)) * up(x))``) through :class:`_SwiGLUDownA` while training."""
    down = self.down_proj
    name = _plain_lora_adapter(down) if self.training and torch.is_grad_enabled() else None
    gate, up = self.gate_proj(x), self.up_proj(x)  # in the original order (dropout draws)
    if name is None:
        return down(self.act_fn(gate) * up)
    lora_a, lora_b = down.lora_A[name], down.lora_B[name]
    p = lora_a.p if isinstance(lora_a, DropoutLoraA) else getattr(down.lora_dropout[name], "p", 0.0)
    h, a = _SwiGLUDownA.apply(gate, up, lora_a.weight, p if lora_a.training else 0.0)
    return _add_lora_product(down.base_layer(h), a, lora_b, down.scaling[name])


def _light_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT LoRA Linear while training: the LoRA product is added into the base layer's output in place
    (:func:`_add_lora_product`). Under autocast, x goes to LoRA's dropout and A as it is: PEFT first casts it to
    A's fp32 (a copy of the input, and the dropout then runs in fp32), and autocast casts it back to bf16 for A
    (another copy); the product is the same. Anything else (evaluation, several adapters, a variant, extra
    arguments) takes PEFT's own forward."""
    training = self.training and torch.is_grad_enabled() and not args and not kwargs
    name = _plain_lora_adapter(self) if training else None
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    out = self.base_layer(x)  # first, as in PEFT
    lora_a = self.lora_A[name]
    if not torch.is_autocast_enabled(x.device.type):
        x = x.to(lora_a.weight.dtype)
    return _add_lora_product(out, lora_a(self.lora_dropout[name](x)), self.lora_B[name], self.scaling[name])


def add_lora_in_place(model) -> int:
    """Every PEFT LoRA Linear of ``model`` adds its LoRA product into the base output in place while training
    (:func:`_light_lora_forward`), whatever the base layer's precision; returns how many layers changed.
    Measured on the Qwen2.5-1.5B architecture in bf16 (Intel Xeon with AMX, 2 cores, train_speed benchmark),
    together with LoraDropout's cheaper mask (training/dropout.py): 41.5 -> 62-70 tokens/s, peak RSS 6.4 ->
    5.4 GB (68-75 tokens/s once the dropout kept no mask). The profile before showed PEFT's LoRA sum, its
    scaling and the dtype round trips of LoRA's input (output- and input-sized copies per projection) at ~20% of
    a step, the dropout draws at ~14%."""
    changed = 0
    for module in model.modules():
        if (isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict)
                and type(getattr(module, "base_layer", None)) in (nn.Linear, Int8Linear)
                and "forward" not in module.__dict__):
            module.forward = types.MethodType(_light_lora_forward, module)
            changed += 1
    return changed


def _is_silu(module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ in ("SiLUActivation", "SiLU")


def lighten_activations(model) -> dict:
    """Keep fewer activations for the backward pass of a PEFT LoRA model whose frozen linears are int8 (after
    :func:`quantize_frozen_linears`), with the same arithmetic and the same dropout draws:

    - each LoRA A with input dropout becomes a :class:`DropoutLoraA` (no dropped fp32 copy and noise per
      projection);
    - each SwiGLU MLP (gate/up/down over an Int8Linear, SiLU) runs :class:`_SwiGLUDownA` while training;
    - each RMSNorm keeps its output instead of its input (:class:`_RMSNormSavingOutput`): the LoRA A projections
      after it keep that output anyway;
    - each LoRA layer adds its product into the base output in place while training (:func:`add_lora_in_place`,
      which the other precisions run too).

    Returns how many LoRA A, MLP, RMSNorm and LoRA layer forwards changed."""
    lora_a = mlps = norms = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(getattr(module, "base_layer", None), Int8Linear) and isinstance(drops, nn.ModuleDict):
            for name, drop in list(drops.items()):
                a = module.lora_A[name] if name in module.lora_A else None
                if (isinstance(drop, nn.Dropout) and drop.p > 0 and type(a) is nn.Linear and a.bias is None
                        and name not in getattr(module, "lora_variant", {})):
                    module.lora_A[name] = DropoutLoraA(a, drop.p)
                    drops[name] = nn.Identity()
                    lora_a += 1
        if (all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
                and _is_silu(getattr(module, "act_fn", None))
                and isinstance(getattr(module.down_proj, "base_layer", None), Int8Linear)
                and "forward" not in module.__dict__):
            module.forward = types.MethodType(_light_swiglu_forward, module)
            mlps += 1
        if "forward" not in module.__dict__ and _is_plain_rms_norm(module):
            module.forward = types.MethodType(_light_rms_norm_forward, module)
            norms += 1
    return {"lora_a": lora_a, "mlp": mlps, "norms": norms, "lora_sum": add_lora_in_place(model)}
