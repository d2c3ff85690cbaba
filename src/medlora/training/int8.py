"""`--precision int8`: the frozen base linears of a LoRA model hold int8 weights (the CPU analogue of QLoRA).

The base weights never change during LoRA training, so they do not need fp32. Every frozen ``nn.Linear`` of
the decoder (the ``base_layer`` inside each PEFT LoRA layer, and any projection LoRA does not target) is
replaced by an :class:`Int8Linear`: two int8 copies of the weight, W (out x in) for the forward pass and W^T
(in x out) for the input gradient of the backward pass, each with its own per-row (per-output-channel) fp32
scales and prepacked for oneDNN. Together they take ~2.2 bytes per weight instead of fp32's 4, and the
fp32 weights are released. Activations (and, in the backward pass, the incoming gradients) are quantised
per token (per row) on the fly. LoRA A/B, norms, embeddings, the LM head, the optimiser and the loss stay
fp32, and the module names do not change (``...q_proj.base_layer``), so the saved adapter is an ordinary
fp32 PEFT adapter that loads onto the unquantised base, and checkpoints, resume and merge see the usual
LoRA weights. No gradient ever reaches the int8 weights: they are plain tensors outside autograd (not
parameters, not buffers, not in the state dict), and only the input gradient is computed.

Kernel choice (measured on a 2-core AMD EPYC Zen 3, AVX2/FMA, no AVX-512, no VNNI, no native bf16; the
machine was shared, so absolute times are contended, ratios interleaved best-of-9; torch 2.13.0, torchao
0.18.0; the 7 Qwen2.5-1.5B projections of one decoder layer at 300 tokens, forward + input gradient,
1 thread; one token scaled x50 as an outlier):

    fp32 F.linear                                                1264 ms   1.00x
    oneDNN ``onednn::qlinear_pointwise``, per-token activations   616 ms   2.05x   ~1.5-2.1% output error
    fbgemm ``quantized::linear_dynamic``, per-tensor activations  602 ms   2.10x   20-26% output error
    fbgemm, rows pre-scaled so per-tensor acts per-token          719 ms   1.76x   ~1.5-2.1%
    torchao 0.18 Int8DynamicActivationInt8WeightConfig (eager)    -> torch._int_mm, which on an AVX2 CPU
        takes 4.3 s for one 300x1536x1536 product (fp32: ~0.1 s): about 40x slower than fp32
    torch._weight_int8pack_mm (weight-only int8)                  2.9 s for the same product

The same on the idle machine with 2 threads: fp32 578 ms, oneDNN per-token 247 ms (2.34x), fbgemm per-token
255 ms (2.26x), fbgemm per-tensor 253 ms (2.29x).

oneDNN's op is the one PyTorch's own x86 int8 path (inductor, torchao's PT2E X86InductorQuantizer) lowers
to, and it takes plain int8/uint8 tensors; fbgemm's ``linear_dynamic`` needs a ``torch.qint8`` quantised
tensor, whose creation torch 2.13 deprecates (as it deprecates the ``torch.ao.quantization`` API), and it
quantises activations per tensor, which one outlier token (LLMs have them) ruins. Hence oneDNN, with the
per-token quantisation written here: oneDNN takes one activation scale per tensor, so each row is quantised
symmetrically with its own scale around a shared zero point and the int32-accurate output row is multiplied
by that scale afterwards (exact: sum_k (q_ik - zp) w_kj s_i = s_i sum_k (q_ik - zp) w_kj).

Without VNNI (AVX2-only CPUs such as Zen 3), oneDNN multiplies uint8 x int8 with ``vpmaddubsw``, which adds
pairs of products into int16 and saturates (255 x 127 x 2 > 32767; measured: a worst-case product came
out half its true value; on SmolLM2's real activations with 8-bit weights, 3,504 of 979,776 outputs of 21
projections differed from the exact integer product). So there the weights use 7 bits ([-63, 63]) and
activations 8: 2 x 255 x 63 = 32130 fits. That costs less than the alternative, 7-bit activations as fbgemm's
``reduce_range`` does: mean relative output error over those 21 projections, real prompt, per-token
activations: 8/8 bits 2.91%, 7-bit weights 3.24%, 7-bit activations 5.58%. On CPUs with AVX512-VNNI, AVX-VNNI
or AMX (int32 accumulation, no saturation) both use 8 bits.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cpu import cpu_flags
from ..errors import MedloraError

_TINY = torch.finfo(torch.float32).tiny


def int8_without_saturation() -> bool:
    """True where int8 dot products accumulate straight into int32 (VNNI or AMX): full 8-bit weights."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_available() -> bool:
    """True where PyTorch has oneDNN's int8 linear (x86 builds)."""
    try:
        packed = torch.ops.onednn.qlinear_prepack(torch.ones(2, 2, dtype=torch.int8), None)
        out = torch.ops.onednn.qlinear_pointwise(torch.full((1, 2), 129, dtype=torch.uint8), 1.0, 128, packed,
                                                 torch.ones(2), torch.zeros(2, dtype=torch.int64), None, 1.0, 0,
                                                 torch.float32, "none", [], "")
        return bool(torch.equal(out, torch.full((1, 2), 2.0)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class PackedInt8:
    """One matrix (out x in) as int8 with per-row fp32 scales, prepacked for oneDNN; ``matmul(x)`` = x @ M^T."""

    def __init__(self, weight: torch.Tensor, weight_max: int):
        weight = weight.detach().float().contiguous()  # prepack reads the raw buffer: copy W^T row-major
        self.shape = tuple(weight.shape)
        self.scale = (weight.abs().amax(dim=1) / weight_max).clamp_(min=_TINY).contiguous()
        q = torch.round(weight / self.scale[:, None]).clamp_(-weight_max, weight_max).to(torch.int8)
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)  # oneDNN's blocked layout; q is freed
        self.zero_points = torch.zeros(self.shape[0], dtype=torch.int64)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 (M x in) -> fp32 (M x out), activations quantised per row to uint8 around zero point 128."""
        x = x.float()
        row_scale = (x.abs().amax(dim=1, keepdim=True) / 127).clamp_(min=_TINY)
        q = torch.div(x, row_scale).round_().add_(128).to(torch.uint8)
        out = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, self.packed, self.scale, self.zero_points, None,
                                                 1.0, 0, torch.float32, "none", [], "")
        return out.mul_(row_scale)

    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] + self.scale.numel() * 4


class _FrozenInt8Matmul(torch.autograd.Function):
    """y = x @ W^T with int8 W; backward returns only the input gradient grad_y @ W (through W^T's own copy)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.forward_weight.matmul(x)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None
        return ctx.layer.backward_weight.matmul(grad_out.contiguous()), None


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is held as int8 (see the module docstring). The bias, if any,
    stays an fp32 parameter with requires_grad False."""

    def __init__(self, linear: nn.Linear, weight_max: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.forward_weight = PackedInt8(weight, weight_max)          # W: out x in
        self.backward_weight = PackedInt8(weight.t(), weight_max)     # W^T: in x out, per-input-channel scales
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear, 127 if int8_without_saturation() else 63)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = _FrozenInt8Matmul.apply(flat, self)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def frozen_weight_count(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_frozen_linears(model) -> int:
    """Replace every frozen ``nn.Linear`` of ``model`` (a PEFT model: the LoRA layers' ``base_layer`` and
    untargeted projections) by an :class:`Int8Linear`, except the output embedding (LM head); the fp32
    weights are released. Returns how many layers were replaced."""
    if not int8_available():
        raise MedloraError("--precision int8 needs PyTorch's oneDNN int8 kernels (an x86 CPU build of torch); "
                           "use --precision fp32")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child is not head and not child.weight.requires_grad]
    for parent, name, child in swaps:
        setattr(parent, name, Int8Linear.from_linear(child))
        child.weight = None  # release the fp32 weight now, whoever else still holds the module
    _return_freed_memory()
    return len(swaps)


def _return_freed_memory() -> None:
    """Hand the heap memory freed by quantising back to the OS. glibc keeps freed blocks below its (adaptive,
    up to 32 MB) mmap threshold in the heap, and torch has no call for it: measured on 4 Qwen2.5-1.5B-shaped
    layers, quantising freed only 136 MB of RSS without this and 346 MB with it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def frozen_int8_parameters(model) -> int:
    """Weights held in Int8Linear layers (outside nn.Parameters), for parameter counts."""
    return sum(m.frozen_weight_count() for m in model.modules() if isinstance(m, Int8Linear))


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) as peft's get_nb_trainable_parameters, counting the int8 weights too."""
    trainable, total = model.get_nb_trainable_parameters()
    return trainable, total + frozen_int8_parameters(model)
