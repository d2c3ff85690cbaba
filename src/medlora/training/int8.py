"""`--precision int8`: the frozen base linears of a LoRA model hold int8 weights (the CPU analogue of QLoRA).

The base weights never change during LoRA training, so they do not need fp32. Every frozen ``nn.Linear`` of
the decoder (the ``base_layer`` inside each PEFT LoRA layer, and any projection LoRA does not target) is
replaced by an :class:`Int8Linear`: two int8 copies of the weight, W (out x in) for the forward pass and W^T
(in x out) for the input gradient of the backward pass, each with its own per-row (per-output-channel) fp32
scales and prepacked for oneDNN. Together they take ~2 bytes per weight instead of fp32's 4, and the
fp32 weights are released. Activations (and, in the backward pass, the incoming gradients) are quantised
per token (per row) on the fly. The token embedding and the LM head (one matrix when tied, as in Qwen2.5) are
held once as plain int8 rows (:class:`Int8Rows`) whose products run on the unquantised activations, in fp32,
or in bf16 where the CPU has native bf16.
LoRA A/B, norms, the optimiser and the loss stay fp32, and the module names do not change
(``...q_proj.base_layer``), so the saved adapter is an ordinary
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
per-token quantisation written here: oneDNN takes one activation scale and zero point per tensor, so each
row is quantised asymmetrically over its own [min, max] to uint8 with zero point 0 (x_ik ~ lo_i + step_i q_ik),
oneDNN computes sum_k q_ik w_kj exactly in int32, and the output row is scaled by step_i and shifted by
lo_i sum_k w_kj afterwards (exact algebra; :meth:`PackedInt8.matmul`). Asymmetric rows use all 256 levels on
one-sided activations (SiLU outputs, norm outputs with a large channel of one sign); on MedQuAD this took the
int8 run's eval loss from +1.15% over fp32 (symmetric) to +0.46%.

Before quantising, each matrix and every activation row that meets it are rotated by the same block-diagonal
Hadamard matrix (:func:`rotate`, blocks of up to 64 columns), which leaves the product unchanged and spreads the
few outlier channels of LLM activations over their block, so a per-token scale no longer spends its levels on
them (QuaRot's idea, without folding the rotation into the model: the weights and LoRA stay in their own basis).
On CPUs with VNNI/AMX (8-bit weights) the bundled-sample quality test failed without it (eval loss +1.57% over
fp32's, criterion 1%) and passes with it (+0.30%). On MedQuAD (benchmarks/int8_quality.py, 10 steps, on that
Xeon with AMX): eval loss over fp32's 8-bit weights +0.49% -> +0.32%, 7-bit +0.90% -> -0.18%; the untrained
forward pass alone +0.86% -> -0.01% and +0.63% -> -0.16%. Cost: one small fp32 matmul per product (2 x 64
FLOPs per element); the full-size training step on a Xeon with AMX was as fast as without it within the
run-to-run spread.

Memory: the int8 weights take ~2 bytes per weight instead of 4 (oneDNN's packed layout measured 1.00 byte a
weight for each copy; the tied embedding and LM head 1 byte in all); ``training/lighter.py`` keeps fewer
activations for the backward pass (measurements there). Why two copies: oneDNN multiplies by a packed matrix
in one orientation only, and packing on the fly costs more than it saves. Measured for the seven projections
of one Qwen2.5-1.5B layer at 400 tokens (2-core Zen 4): with AVX2 kernels (ONEDNN_MAX_CPU_ISA=AVX2, as on a
Zen 3) packing took 14 ms against 126 ms for the forward products, but W^T must first be copied out of W
(65 ms with the copy; packing a transposed view gives wrong products); with the VNNI kernels packing took
190 ms against 63 ms for the products.

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

from ..cpu import cpu_flags, cpu_has_native_bf16
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


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-row uint8 quantisation of a 2-D fp32 tensor: (q, step, lo) with x ~ lo + step * q, q in
    [0, 255]. amin and amax as two reductions and a multiplication by the inverse step: faster on a CPU than
    torch.aminmax and a division (measured 11.7 ms against 18.6 ms for 300 x 8960, one thread), and faster than
    the symmetric quantisation it replaces (13.1 ms)."""
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    span = (hi - lo).clamp_(min=_MIN_SPAN)  # a constant row: q = 0, and no overflow in 255 / span
    q = (x - lo).mul_(255 / span).round_().to(torch.uint8)  # (x - lo) * 255 / span <= 255 (+ rounding): no wrap
    return q, span.div_(255), lo


_MIN_SPAN = 1e-30
_QUANTIZE_ROWS = 4096  # weights are quantised in row blocks: no full-size fp32 temporaries (an LM head is 0.9 GB)
_ROTATION = 64  # the largest Hadamard block (see rotate); 128 measured no better than 64 on SmolLM2


def rotation_block(n: int) -> int:
    """The Hadamard block size for rows of length n: the largest power of two <= _ROTATION that divides n (1: none)."""
    b = 1
    while b < _ROTATION and n % (2 * b) == 0:
        b *= 2
    return b


_HADAMARD: dict[int, torch.Tensor] = {}


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (2-D fp32, rows of length n) times the block-diagonal orthonormal Hadamard matrix with blocks of `block`
    (symmetric and its own inverse), so (x H)(W H)^T = x W^T exactly. Written here: PyTorch has no Hadamard
    transform on the CPU. Why: LLM activations have a few channels many times larger than the rest (measured on
    SmolLM2 and the bundled rows: a channel's maximum up to 15x the median channel's before the attention
    projections, 160x before down_proj), and a per-token scale spends its 256 levels on them; the rotation
    spreads each one over its block, as QuaRot does with its Hadamard rotations. Measured there (8-bit weights,
    per-token activations, mean relative output error): q_proj 1.96% -> 0.82%, v_proj 4.4% -> 1.8%, down_proj
    2.7% -> 1.1%; the seven projections 2.2% -> 1.1%. One small matmul per product: 2 x block FLOPs per element."""
    if block == 1:
        return x
    h = _HADAMARD.get(block)
    if h is None:
        h = torch.ones(1, 1)
        while h.shape[0] < block:  # Sylvester's construction
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        h = _HADAMARD.setdefault(block, h / block ** 0.5)
    return torch.mm(x.reshape(-1, block), h).reshape(x.shape)


def quantize_weight_rows(weight: torch.Tensor, weight_max: int, block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantisation of a 2-D weight (any float dtype, any strides, W^T included), rotated
    first by :func:`rotate` with `block`: (q, scale) with rotate(weight) ~ scale[:, None] * q, q a contiguous
    row-major int8 tensor in [-weight_max, weight_max]. lighter.py keeps the MLP's gate and up with it too,
    in rows of 64 values."""
    weight = weight.detach()
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0])
    for start in range(0, weight.shape[0], _QUANTIZE_ROWS):
        # a copy either way (never the caller's tensor): the float32 conversion, or the rotation's product
        block_rows = rotate(weight[start:start + _QUANTIZE_ROWS].to(torch.float32, copy=True), block)
        s = (block_rows.abs().amax(dim=1) / weight_max).clamp_(min=_TINY)
        q[start:start + _QUANTIZE_ROWS] = block_rows.div_(s[:, None]).round_().clamp_(-weight_max, weight_max)
        scale[start:start + _QUANTIZE_ROWS] = s
    return q, scale


class PackedInt8:
    """One matrix (out x in) as int8 with per-row fp32 scales, prepacked for oneDNN; ``matmul(x)`` = x @ M^T."""

    def __init__(self, weight: torch.Tensor, weight_max: int, block: int | None = None):
        self.shape = tuple(weight.shape)
        # M and every x are rotated alike (block 1: not at all), so x @ M^T is unchanged
        self.block = rotation_block(self.shape[1]) if block is None else block
        q, self.scale = quantize_weight_rows(weight, weight_max, self.block)
        # the row sums of the dequantised matrix (exact integer sums, then scaled): the offset term of matmul
        self.row_sum = q.sum(dim=1, dtype=torch.int32).float().mul_(self.scale)
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)  # oneDNN's blocked layout; q is freed
        self.zero_points = torch.zeros(self.shape[0], dtype=torch.int64)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 (M x in) -> fp32 (M x out). x is rotated as M was (:func:`rotate`), then each row i is quantised
        asymmetrically to uint8 over its own range,
        x_ik ~ lo_i + step_i q_ik (q in [0, 255], zero point 0), so that skewed rows (SiLU outputs, a norm output
        with a large channel of one sign) use all 256 levels; then x @ M^T = step_i (q @ M^T)_ij + lo_i sum_k M_jk:
        oneDNN computes the first term exactly in int32, the offset term is an outer product added afterwards."""
        q, step, lo = quantize_rows(rotate(x.float(), self.block))
        out = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, self.packed, self.scale, self.zero_points, None,
                                                 1.0, 0, torch.float32, "none", [], "")
        return out.mul_(step).addr_(lo.view(-1), self.row_sum)

    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] + self.scale.numel() * 8


class _FrozenInt8Matmul(torch.autograd.Function):
    """y = x @ W^T for a frozen int8 layer (:class:`Int8Linear`, :class:`Int8Head`), through its ``product``;
    backward returns only the input gradient grad_y @ W, through its ``input_gradient``."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.product(x)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None
        return ctx.layer.input_gradient(grad_out.contiguous()), None


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

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_weight.matmul(x)

    def input_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return self.backward_weight.matmul(grad)  # through W^T's own copy

    def frozen_weight_count(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Rows:
    """A frozen vocabulary matrix M (vocab x hidden: a token embedding, an LM head, or one matrix tied to both) as
    plain row-major int8 rows with per-row fp32 scales (all 8 bits: no int8 kernel reads them), and the three
    things a LoRA run does with it: look rows up, x @ M^T (logits) and grad @ M (their input gradient), the two
    products from dequantised row blocks. The activations are not quantised: on MedQuAD (SmolLM2, 10 steps) an
    LM head through the int8 kernel, per-token activations as in :class:`Int8Linear`, left the int8 run's eval
    loss 1.92% above fp32's, this one 0.32%. For Qwen2.5-1.5B the tied matrix takes 0.23 GB instead of fp32's 0.93.

    The products run in fp32 (``_BLOCK`` rows at a time), or in bf16 where the CPU multiplies bf16 natively
    (``bf16``, ``_BF16_BLOCK`` rows at a time): the int8 rows convert to bf16 exactly (|q| <= 127 fits its 8-bit
    significand) and the fp32 scales are applied to the fp32 result, so only the activations and each block's
    product are rounded to bf16 (0.23% relative error on random data, as the default bf16 path's LM head).
    Measured for Qwen2.5-1.5B's head at 288 answer tokens, the two products: on 2 Zen 3 cores in fp32 1.8 s and
    1.35 s (a plain fp32 head: 1.76 s and 1.18 s); on 2 Zen 4 cores in fp32 0.90 s and 0.91 s, in bf16 0.43 s and
    0.41 s."""

    def __init__(self, weight: torch.Tensor, bf16: bool = False):
        self.table, self.scale = quantize_weight_rows(weight, 127)
        self.bf16 = bf16

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids].float().mul_(self.scale[ids].unsqueeze(-1))

    def _blocks(self):
        """(row slice, the rows as the products' dtype) for each block of the table."""
        dtype, size = (torch.bfloat16, _BF16_BLOCK) if self.bf16 else (torch.float32, _BLOCK)
        for start in range(0, self.table.shape[0], size):
            block = slice(start, start + size)
            yield block, self.table[block].to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ M^T: tokens x hidden -> tokens x vocab (the scales applied to the result's columns)."""
        out = x.new_empty(x.shape[0], self.table.shape[0])
        x_low = x.to(torch.bfloat16) if self.bf16 else x
        for block, rows in self._blocks():
            if self.bf16:
                out[:, block] = torch.mm(x_low, rows.t())
            else:
                torch.mm(x, rows.t(), out=out[:, block])
        return out.mul_(self.scale)

    def left_matmul(self, grad: torch.Tensor) -> torch.Tensor:
        """grad @ M: tokens x vocab -> tokens x hidden (the scales folded into grad one block at a time: a scaled
        copy of the whole grad, tokens x vocab, would be alive beside it at the start of the backward pass, when
        every activation is: 175 MB for 288 answer tokens of Qwen2.5)."""
        out = grad.new_zeros(grad.shape[0], self.table.shape[1])
        for block, rows in self._blocks():
            scaled = grad[:, block] * self.scale[block]
            if self.bf16:
                out.add_(torch.mm(scaled.to(torch.bfloat16), rows))
            else:
                out.addmm_(scaled, rows)
        return out


_BLOCK = 512  # 512 x hidden fp32 rows at a time (3 MB for Qwen2.5-1.5B): measured fastest of 512/1024/2048
_BF16_BLOCK = 2048  # bf16 (Zen 4, Qwen2.5-1.5B head, 288 tokens): 512 rows 0.71 s, 2048 0.43 s, 8192 0.44-0.49 s


class Int8Embedding(nn.Module):
    """A frozen ``nn.Embedding`` held as :class:`Int8Rows` (shared with a tied LM head): a lookup returns the
    dequantised fp32 rows."""

    def __init__(self, embedding: nn.Embedding, rows: Int8Rows):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.rows = rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows.lookup(ids)

    def frozen_weight_count(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


class Int8Head(nn.Module):
    """A frozen LM head (``nn.Linear`` vocab x hidden, no bias) held as :class:`Int8Rows`, the same object as a
    tied token embedding's."""

    def __init__(self, linear: nn.Linear, rows: Int8Rows, tied: bool):
        super().__init__()
        self.in_features, self.out_features, self.tied = linear.in_features, linear.out_features, tied
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        return _FrozenInt8Matmul.apply(flat, self).reshape(*x.shape[:-1], self.out_features)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows.matmul(x)

    def input_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return self.rows.left_matmul(grad)

    def frozen_weight_count(self) -> int:
        return 0 if self.tied else self.in_features * self.out_features  # tied: counted with the embedding

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8{', tied' if self.tied else ''}"


def quantize_frozen_linears(model) -> int:
    """Replace every frozen ``nn.Linear`` of ``model`` (a PEFT model: the LoRA layers' ``base_layer`` and
    untargeted projections) by an :class:`Int8Linear`, the LM head by an :class:`Int8Head` and every frozen
    ``nn.Embedding`` (the token embedding) by an :class:`Int8Embedding`, a tied head and embedding sharing one
    :class:`Int8Rows`; the fp32 weights are released. Returns how many layers were replaced."""
    if not int8_available():
        raise MedloraError("--precision int8 needs PyTorch's oneDNN int8 kernels (an x86 CPU build of torch); "
                           "use --precision fp32")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) in (nn.Linear, nn.Embedding) and not child.weight.requires_grad]
    rows: dict[int, Int8Rows] = {}  # id of a vocabulary matrix (all are alive until the loop ends) -> its int8 rows

    def rows_of(weight: nn.Parameter) -> Int8Rows:
        if id(weight) not in rows:
            rows[id(weight)] = Int8Rows(weight, bf16=cpu_has_native_bf16())
        return rows[id(weight)]

    for parent, name, child in swaps:
        if type(child) is nn.Embedding:
            setattr(parent, name, Int8Embedding(child, rows_of(child.weight)))
        elif child is head and child.bias is None:
            setattr(parent, name, Int8Head(child, rows_of(child.weight), tied))
        else:
            setattr(parent, name, Int8Linear.from_linear(child))
        if not (tied and child.weight is head.weight):  # a tied matrix: when both of its modules are done
            child.weight = None  # release the fp32 weights now, whoever else still holds the module
    for _, _, child in swaps:
        child.weight = None
    return len(swaps)


def frozen_int8_parameters(model) -> int:
    """Weights held in int8 layers (outside nn.Parameters), a tied matrix once, for parameter counts."""
    return sum(m.frozen_weight_count() for m in model.modules() if isinstance(m, (Int8Linear, Int8Head, Int8Embedding)))


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) as peft's get_nb_trainable_parameters, counting the int8 weights too."""
    trainable, total = model.get_nb_trainable_parameters()
    return trainable, total + frozen_int8_parameters(model)
