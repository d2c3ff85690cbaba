"""`--precision int8`: int8 frozen base weights (training/int8.py).

The int8 linear is checked against fp32 on random data (forward output and input gradient, and that no
gradient reaches its int8 weights), on a real PEFT model (which layers turn int8, that the adapter's state
dict is an fp32 run's), and end to end on the bundled SmolLM2: fp32 and int8 runs on the same rows for the
same steps reach eval losses within 1%, and the int8 run's adapter on the unquantised base is within 1% of
the fp32 run's. Resume at int8 is in test_resume.py."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import medlora.training.int8 as int8_module
import medlora.training.lighter as lighter_module
from medlora.cpu import cpu_has_native_bf16
from medlora.training.int8 import (Int8Embedding, Int8Head, Int8Linear, PackedInt8, frozen_int8_parameters,
                                   int8_available, parameter_counts, quantize_frozen_linears, quantize_rows)
from medlora.training.dropout import LoraDropout
from medlora.training.lighter import DropoutLoraA, _DropoutMatmul, _SwiGLUDownA, lighten_activations

pytestmark = pytest.mark.skipif(not int8_available(), reason="this torch build has no oneDNN int8 linear")

# Relative (Frobenius) error allowed against fp32. Measured on a 2-core AMD EPYC Zen 3 (AVX2, no VNNI: 7-bit
# weights, 8-bit per-token activations): ~1.0% on the random data below, 1.5-2.1% on the Qwen2.5-1.5B
# projection shapes with an outlier token; 3.2% mean over SmolLM2's projections on a real prompt.
TOLERANCE = 0.03


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def frozen_linear(n_in: int, n_out: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(n_in, n_out, bias=bias)
    return lin.requires_grad_(False)


@pytest.mark.parametrize("outlier", [1.0, 50.0])
def test_int8_linear_matches_fp32_output_and_input_gradient(outlier):
    lin = frozen_linear(320, 448)
    q = Int8Linear.from_linear(lin)
    torch.manual_seed(1)
    x = torch.randn(2, 40, 320)
    x[0, 0] *= outlier  # one token far larger than the rest (LLMs have them): per-token scales keep the others
    x8, x32 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y8, y32 = q(x8), lin(x32)
    assert y8.shape == y32.shape == (2, 40, 448)
    grad = torch.randn_like(y32)
    y8.backward(grad)
    y32.backward(grad)
    assert 0 < rel(y8, y32) < TOLERANCE
    assert 0 < rel(x8.grad, x32.grad) < TOLERANCE
    for row in (0, 1, 39):  # every token, not just the total, is close
        assert rel(y8[1, row], y32[1, row]) < 2 * TOLERANCE and rel(x8.grad[1, row], x32.grad[1, row]) < 2 * TOLERANCE


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32_products", "bf16_products"])
def test_tied_int8_embedding_and_head_match_fp32_and_train_nothing(bf16):
    """The token embedding and a tied LM head share one Int8Rows (8-bit rows, unquantised activations; the
    products in fp32, or in bf16 as on CPUs with native bf16): lookups, logits and the logits' input gradient
    within 1% of fp32 on random data; no gradient, parameter or buffer in either."""
    from medlora.training.int8 import Int8Rows

    torch.manual_seed(2)
    embedding = nn.Embedding(5000, 96).requires_grad_(False)  # > one block of either kind (512 / 2048 rows)
    head = nn.Linear(96, 5000, bias=False)
    head.weight = embedding.weight  # tied, as Qwen2.5 and SmolLM2
    rows = Int8Rows(embedding.weight, bf16=bf16)
    emb8, head8 = Int8Embedding(embedding, rows), Int8Head(head, rows, tied=True)
    assert rows.table.dtype == torch.int8 and rows.table.shape == (5000, 96)
    assert not list(emb8.parameters()) + list(head8.parameters()) + list(emb8.buffers()) + list(head8.buffers())
    ids = torch.tensor([[0, 5, 4999, 5], [7, 7, 3, 0]])
    assert 0 < rel(emb8(ids), embedding(ids)) < 0.01 and emb8(ids).dtype == torch.float32
    h8, h32 = (torch.randn(2, 70, 96).requires_grad_(True) for _ in range(2))
    with torch.no_grad():
        h32.copy_(h8)
    y8, y32 = head8(h8), head(h32)
    assert y8.shape == y32.shape == (2, 70, 5000) and y8.dtype == torch.float32 and 0 < rel(y8, y32) < 0.01
    assert rel(y8[:, :, -1], y32[:, :, -1]) < 0.01  # the last, partial block too
    grad = torch.randn_like(y32)
    y8.backward(grad)
    y32.backward(grad)
    assert 0 < rel(h8.grad, h32.grad) < 0.01
    assert not rows.table.requires_grad and rows.table.grad is None and rows.scale.grad is None
    assert head8.frozen_weight_count() == 0 and emb8.frozen_weight_count() == 5000 * 96  # the tied matrix once


def test_no_gradient_reaches_the_int8_weights():
    lin = frozen_linear(64, 96)
    q = Int8Linear.from_linear(lin)
    # the int8 copies are plain tensors outside autograd: no parameter, buffer or state-dict entry but the bias
    assert [n for n, _ in q.named_parameters()] == ["bias"] and not list(q.buffers())
    assert list(q.state_dict()) == ["bias"] and not q.bias.requires_grad
    packed = [q.forward_weight.packed, q.forward_weight.scale, q.backward_weight.packed, q.backward_weight.scale]
    assert q.forward_weight.packed.dtype == q.backward_weight.packed.dtype == torch.int8
    assert q.forward_weight.shape == (96, 64) and q.backward_weight.shape == (64, 96)  # W and W^T
    assert not any(t.requires_grad for t in packed)
    x = torch.randn(5, 64, requires_grad=True)
    q(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the input gradient flows
    assert q.bias.grad is None and all(t.grad is None for t in packed)
    # and an input that needs no gradient gives an output that needs none (nothing to train here)
    assert not q(torch.randn(3, 64)).requires_grad


def dequantised_product(x: torch.Tensor, w: torch.Tensor, weight_max: int,
                        block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(x quantised per row to [0, 255] over its own range) @ (w quantised per row to +-weight_max)^T, in float64
    from the dequantised values, with PackedInt8's quantisation (both rotated first when block > 1); and
    |x| @ |w|^T (the size of the terms)."""
    x, w = int8_module.rotate(x, block), int8_module.rotate(w, block)
    q, step, lo = quantize_rows(x)
    assert q.dtype == torch.uint8 and (q.amin(dim=1) == 0).all()  # every row starts at level 0 ...
    assert (q.amax(dim=1)[(x.amax(dim=1) > x.amin(dim=1))] == 255).all()  # ... and a non-constant one ends at 255
    xq = q.double() * step.double() + lo.double()
    scale = (w.abs().amax(dim=1) / weight_max).clamp_(min=torch.finfo(torch.float32).tiny)
    wq = torch.round(w / scale[:, None]).clamp_(-weight_max, weight_max).double() * scale[:, None].double()
    return xq @ wq.t(), xq.abs() @ wq.abs().t()


@pytest.mark.parametrize("block", [1, 32])
@pytest.mark.parametrize("weight_max", [63, 127])
def test_asymmetric_activations_are_exact_algebra(weight_max, block):
    """PackedInt8 quantises each activation row over its own [min, max] around zero point 0 and adds the offset
    term min_i * rowsum(W) afterwards: the result is the product of the dequantised operands up to fp32 rounding,
    for skewed, constant, huge and all-negative rows, and (7-bit weights, no rotation, so that the extremes
    below reach the kernel) with no 16-bit saturation in the uint8 x int8 pair products of CPUs without VNNI,
    even when every product is at its largest; rotated (block 32, as PackedInt8 picks for 96 columns), the
    same algebra on the rotated operands."""
    assert int8_module.rotation_block(96) == 32
    if weight_max == 127 and not int8_module.int8_without_saturation():
        pytest.skip("8-bit weights saturate without VNNI/AMX; this CPU uses 7-bit ones")
    torch.manual_seed(0)
    w = torch.randn(40, 96)
    w[0] = 1.0  # every weight of row 0 at +weight_max ...
    x = torch.randn(8, 96)
    x[1] = nn.functional.silu(3 * x[1]) * x[2]  # SwiGLU-like: mostly small, a long tail to one side
    x[2] = 5.0  # constant row (step clamped, q = 0)
    x[3] *= 1e4
    x[4] = -x[4].abs() - 7  # all negative, far from 0
    x[5] = 1000 + x[5] * 1e-2  # a large offset with a small range
    x[6] = 3.0
    x[6, 0] = -3.0  # ... against q = 255 in all but one column: the largest pair sums the kernel can see
    packed = PackedInt8(w, weight_max, block)
    ref, size = dequantised_product(x, w, weight_max, block)
    out = packed.matmul(x).double()
    assert out.shape == (8, 40) and out.dtype == torch.float64
    assert ((out - ref).abs() <= 1e-5 * size + 1e-30).all()


def test_asymmetric_quantisation_lowers_the_error_on_one_sided_rows():
    """A decoder's norm outputs carry a few large channels of one sign in every token: symmetric per-row
    quantisation spends half its levels on the empty side, the asymmetric one uses them all (activation error
    alone, against the product with the same int8 weights)."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    x = torch.randn(50, 256)
    x[:, 7] = 20.0  # one large positive channel
    w_deq = dequantised_product(torch.eye(256), w, 63)[0].t().float()  # the int8 weights, dequantised
    exact = x @ w_deq.t()
    step = x.abs().amax(dim=1, keepdim=True) / 127
    symmetric = (torch.round(x / step).clamp_(-127, 127) * step) @ w_deq.t()
    asymmetric = PackedInt8(w, 63, block=1).matmul(x)  # no rotation: the quantisation alone
    assert rel(asymmetric, exact) < 0.7 * rel(symmetric, exact)


@pytest.mark.parametrize("weight_max", [63, 127])
def test_the_hadamard_rotation_is_exact_and_spreads_outlier_channels(weight_max):
    """rotate is orthonormal and its own inverse; with a few channels many times larger than the rest (as LLM
    activations have), rotating before quantising cuts the int8 product's error against fp32 (measured: 2.4% ->
    1.5% with 7-bit weights, whose own error is then most of it; 1.9% -> 0.85% with 8-bit ones)."""
    if weight_max == 127 and not int8_module.int8_without_saturation():
        pytest.skip("8-bit weights saturate without VNNI/AMX; this CPU uses 7-bit ones")
    torch.manual_seed(0)
    x = torch.randn(30, 192)
    assert int8_module.rotation_block(192) == 64 and int8_module.rotation_block(9) == 1
    assert rel(int8_module.rotate(int8_module.rotate(x, 64), 64), x) < 1e-6
    assert int8_module.rotate(x, 1) is x
    w = torch.randn(80, 192) * 0.05
    x[:, [3, 100]] *= 30  # two outlier channels in every token
    exact = x @ w.t()
    plain, rotated = (rel(PackedInt8(w, weight_max, block).matmul(x), exact) for block in (1, None))
    assert rotated < 0.7 * plain and rotated < 0.02


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("kept", ["fp32", "bf16", "int8"])
def test_swiglu_down_a_matches_autograd(p, kept, monkeypatch):
    """_SwiGLUDownA (silu(gate) * up and the dropped-out LoRA A projection of it, saving gate and up only)
    against autograd on the plain expression with the same dropout draw: outputs, all three gradients, and the
    random stream after it. fp64, so that only the rounding of the kept gate and up (bf16, or int8 in groups of
    64 values, as --precision int8 keeps them) differs."""
    monkeypatch.setattr(lighter_module, "SAVE_MLP_INPUTS", kept)
    torch.manual_seed(0)
    gate, up, a_w = torch.randn(2, 9, 128).double(), torch.randn(2, 9, 128).double(), torch.randn(4, 128).double()
    g_h, g_a = torch.randn(2, 9, 128).double(), torch.randn(2, 9, 4).double()
    results = []
    for fused in (True, False):
        ins = [t.clone().requires_grad_(True) for t in (gate, up, a_w)]
        torch.manual_seed(1)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            if fused:
                h, a = _SwiGLUDownA.apply(*ins, p)
            else:
                h = nn.functional.silu(ins[0]) * ins[1]
                a = nn.functional.linear(LoraDropout(p)(h), ins[2])
        after = torch.rand(3)
        (h * g_h).sum().add((a * g_a).sum()).backward()
        results.append((h, a, *(t.grad for t in ins), after))
        if fused:  # gate and up, as kept
            assert [t.dtype for t in saved if t.shape == gate.shape or t.numel() == gate.numel()] == 2 * [
                {"fp32": torch.float64, "bf16": torch.bfloat16, "int8": torch.int8}[kept]]
    tol = {"fp32": 1e-12, "bf16": 5e-3, "int8": 1.5e-2}[kept]
    for mine, ref in zip(*results):
        assert mine.dtype == ref.dtype and rel(mine.detach(), ref.detach()) < tol


def test_mlp_inputs_kept_in_int8_groups():
    """int8 in groups of 64 values with one scale each: an outlier coarsens only its own group; a zero group stays
    zero; a row length that is no multiple of 64 is kept in bf16."""
    torch.manual_seed(0)
    x = torch.randn(5, 256)
    x[1, 10] = 500.0
    x[2, 64:128] = 0.0
    values, scale = lighter_module._pack_mlp_input(x)
    assert values.dtype == torch.int8 and scale.shape == (20,) and values.abs().max() == 127
    back = lighter_module._unpack_mlp_input(values, scale, x.shape, torch.float32)
    assert back.shape == x.shape and torch.equal(back[2, 64:128], x[2, 64:128])
    error = (back - x).abs()
    assert error[1, :64].max() <= 500 / 254 * 1.001  # the outlier's group: steps of 500/127
    assert error[1, 64:].max() < 0.5 * error[1, :64].max() / 10 and rel(back[[0, 3, 4]], x[[0, 3, 4]]) < 0.01
    odd = lighter_module._pack_mlp_input(torch.randn(3, 40))
    assert odd[0].dtype == torch.bfloat16 and odd[1] is None


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_lora_a_matches_peft_dropout_then_a(p):
    """_DropoutMatmul draws LoraDropout's mask (same random stream) and keeps it as bits: same output and
    gradients as LoRA's dropout followed by the linear, without saving the dropped copy."""
    torch.manual_seed(0)
    x, w, g = torch.randn(3, 11, 24).double(), torch.randn(5, 24).double(), torch.randn(3, 11, 5).double()
    results = []
    for fused in (True, False):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        torch.manual_seed(2)
        y = _DropoutMatmul.apply(xx, ww, p) if fused else nn.functional.linear(LoraDropout(p)(xx), ww)
        after = torch.rand(3)
        y.backward(g)
        results.append((y, xx.grad, ww.grad, after))
    for mine, ref in zip(*results):
        assert rel(mine.detach(), ref.detach()) < 1e-12


def test_rms_norm_keeping_its_output_matches_transformers():
    """_RMSNormSavingOutput (what lighten_activations gives the decoder's RMSNorms): the same output bits as
    transformers' RMSNorm and the same input gradient, keeping its output (which the LoRA A after it keeps
    anyway) instead of its input; norms it cannot stand in for keep their own forward."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-6).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))  # signs and sizes of a trained norm
    x = torch.randn(2, 7, 48) * 4
    x[0, 3] = 0.0  # a zero row: the eps keeps it finite
    grad = torch.randn(2, 7, 48)
    results = []
    for light in (False, True):
        xx = x.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = lighter_module._RMSNormSavingOutput.apply(xx, norm.weight, 1e-6) if light else norm(xx)
        y.backward(grad)
        results.append((y.detach(), xx.grad, {t.untyped_storage().data_ptr() for t in saved}))
    (y0, g0, kept0), (y1, g1, kept1) = results
    assert torch.equal(y1, y0) and rel(g1, g0) < 1e-5
    assert x.untyped_storage().data_ptr() not in kept1  # the input is not kept ...
    assert y1.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert lighter_module._is_plain_rms_norm(norm)
    norm.train()
    with torch.no_grad():  # the patched module: its own forward outside training
        assert torch.equal(lighter_module._light_rms_norm_forward(norm, x), y0)

    class GemmaLikeRMSNorm(LlamaRMSNorm):  # y = (1 + w) * x_hat: not the formula above
        def forward(self, hidden):
            return super().forward(hidden) + hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)

    assert not lighter_module._is_plain_rms_norm(GemmaLikeRMSNorm(48).requires_grad_(False))
    zero = LlamaRMSNorm(48).requires_grad_(False)
    zero.weight.data[5] = 0.0  # the backward pass divides by w
    trained = LlamaRMSNorm(48)  # a trained norm needs its weight's gradient
    assert not lighter_module._is_plain_rms_norm(zero) and not lighter_module._is_plain_rms_norm(trained)


def saved_bytes(model, batch) -> tuple[float, int]:
    """(loss, bytes of the distinct tensors autograd keeps for the decoder layers' backward pass) of one training
    forward (the logits and the loss's tensors, vocabulary-wide, are left out)."""
    storages, vocab = {}, model.get_output_embeddings().out_features

    def pack(t):
        if t.shape and t.shape[-1] != vocab:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=batch, labels=batch)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return out.loss, sum(n for ptr, n in storages.items() if ptr not in params)


def nonzero_lora_b(model) -> None:
    """LoRA B starts at zero; a seeded non-zero B (the same for the same parameter names) makes every path carry
    a gradient."""
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.manual_seed(len(name))
            nn.init.normal_(param, std=0.05)


def peft_model(tiny_model_dir, int8: bool, dropout: float = 0.0):
    from medlora.config import TrainConfig
    from medlora.model import load_model
    from medlora.training.recipe import apply_lora

    torch.manual_seed(0)
    model, _ = apply_lora(TrainConfig(lora_dropout=dropout), load_model(str(tiny_model_dir), False))
    if int8:
        # the 7 projections of the 2 decoder layers, the LM head and the token embedding (tied to it)
        assert quantize_frozen_linears(model) == 2 * 7 + 2
    return model


def test_quantizing_a_peft_model_keeps_the_adapter_an_fp32_runs(tiny_model_dir):
    from peft.utils import get_peft_model_state_dict

    fp32, int8 = peft_model(tiny_model_dir, False), peft_model(tiny_model_dir, True)
    a, b = get_peft_model_state_dict(fp32), get_peft_model_state_dict(int8)
    assert a.keys() == b.keys() and all(b[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)
    layer = int8.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, Int8Linear) and isinstance(layer.lora_A["default"], nn.Linear)
    assert isinstance(int8.get_output_embeddings(), Int8Head) and isinstance(int8.get_input_embeddings(), Int8Embedding)
    assert int8.get_output_embeddings().rows is int8.get_input_embeddings().rows  # tied: one matrix
    assert int8.get_output_embeddings().rows.bf16 == cpu_has_native_bf16()  # the head's products: bf16 where native
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) and not m.weight.requires_grad
                   for m in int8.modules())  # no frozen fp32 linear or embedding left
    assert parameter_counts(int8) == fp32.get_nb_trainable_parameters()  # int8 weights still counted, tied once
    vocab = fp32.get_input_embeddings().num_embeddings
    assert frozen_int8_parameters(int8) == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3) + vocab * 64
    # one training step: LoRA B gets a gradient through the int8 layers, the losses agree with fp32's
    batch = torch.randint(0, 1000, (1, 24))
    losses = []
    for model in (fp32, int8):
        model.train()
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        losses.append(out.loss.item())
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
        assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert losses[1] == pytest.approx(losses[0], rel=0.01)


def test_int8_choice_is_validated_and_explained(tiny_run):
    from medlora.config import CHOICES, build_config
    from medlora.cpu import precision_reason, resolve_precision
    from medlora.errors import MedloraError

    assert "int8" in CHOICES["precision"] and resolve_precision("int8") == "int8"
    assert precision_reason("int8", "int8") == "--precision int8"
    assert build_config(precision="int8").precision == "int8"
    with pytest.raises(MedloraError, match="precision must be one of auto, fp32, bf16, int8"):
        build_config(precision="int4")
    info = json.loads((tiny_run / "run_info.json").read_text())
    assert info["precision"] in ("fp32", "bf16") and info["precision_why"].startswith("auto: ")


@pytest.mark.parametrize("flags, resolved, hint", [
    ({"avx2", "fma"}, "fp32", "1.7x faster than fp32 in half the memory on a Zen 3"),                    # Zen 3
    ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, "bf16", "1.25x faster than bf16 in 16% less memory"),  # Zen 4
    ({"avx2", "avx512_bf16", "amx_bf16", "amx_int8"}, "bf16", None),  # Xeon with AMX: bf16 was the faster there
])
def test_the_int8_hint_follows_what_was_measured_on_each_cpu_class(flags, resolved, hint, monkeypatch):
    import medlora.cpu as cpu

    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)
    assert cpu.resolve_precision("auto") == resolved
    line = cpu.int8_hint("auto", resolved)
    assert (line is None) if hint is None else (hint in line and "within 0.4% of fp32's" in line)
    assert all(cpu.int8_hint(chosen, chosen) is None for chosen in ("fp32", "bf16", "int8"))  # the user chose


@pytest.mark.slow
def test_int8_training_matches_fp32_on_the_bundled_model(sample_csv, tmp_path):
    """Same rows, same steps: eval loss within 1% of fp32's, and the int8 run's adapter on the unquantised
    fp32 base within 1% of the fp32 run's adapter (both measured by the same fp32 code)."""
    from medlora.cli import main
    from medlora.config import TrainConfig
    from medlora.data import load_qa_csv, split
    from medlora.evals.compare import answer_losses
    from medlora.model import load_run_model
    from medlora.rundir import RunDir

    # 6 steps of one 192-token row (prompt ~120 tokens with the default system prompt, the rest answer)
    args = ["--data", str(sample_csv), "--model", "smollm2-135m", "--max_steps", "6",
            "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--lora_dropout", "0",
            "--max_seq_len", "192", "--test_size", "0.1", "--max_eval_samples", "6", "--save_steps", "100"]
    metrics, on_fp32_base = {}, {}
    for precision in ("fp32", "int8"):
        out = tmp_path / precision
        assert main(["train", *args, "--output_dir", str(out), "--precision", precision]) == 0
        metrics[precision] = json.loads((out / "metrics.json").read_text())
        info = json.loads((out / "run_info.json").read_text())
        assert info["precision"] == precision and metrics[precision]["eval_precision"] == precision
        run = RunDir(out)
        model, tokenizer, _ = load_run_model(run)  # the saved adapter on the plain fp32 base
        assert not any(isinstance(m, Int8Linear) for m in model.modules())
        cfg = TrainConfig(**{k: v for k, v in run.read_config_raw().items() if k in TrainConfig.__dataclass_fields__})
        _, evals = split(load_qa_csv(sample_csv)[0], cfg.test_size, cfg.seed)
        losses = answer_losses(model, tokenizer, evals.head(cfg.max_eval_samples), cfg, "eval")
        on_fp32_base[precision] = sum(losses) / len(losses)
    fp32, int8 = metrics["fp32"], metrics["int8"]
    assert fp32["train_steps"] == int8["train_steps"] == 6 and fp32["train_tokens"] == int8["train_tokens"]
    assert fp32["eval_loss"] < fp32["base_eval_loss"] - 0.02  # training moved the model: the comparison means something
    assert int8["eval_loss"] == pytest.approx(fp32["eval_loss"], rel=0.01)
    assert on_fp32_base["fp32"] == pytest.approx(fp32["eval_loss"], rel=1e-4)  # the same measurement as training's
    assert on_fp32_base["int8"] <= on_fp32_base["fp32"] * 1.01


def test_lighter_activations_same_training_step_less_memory(tiny_model_dir):
    """lighten_activations (what --precision int8 runs: LoRA A with its dropout folded in, the SwiGLU MLP through
    _SwiGLUDownA, RMSNorms keeping their output) on an int8 PEFT model with LoRA dropout: same loss, gradients,
    random stream and adapter state dict as the unchanged int8 model, an unchanged eval forward, and fewer saved
    activations."""
    from peft.utils import get_peft_model_state_dict

    plain, light = peft_model(tiny_model_dir, True, 0.1), peft_model(tiny_model_dir, True, 0.1)
    # the norms: 2 per decoder layer and the final one
    assert lighten_activations(light) == {"lora_a": 14, "mlp": 2, "norms": 5, "lora_sum": 14}
    assert lighten_activations(light) == {"lora_a": 0, "mlp": 0, "norms": 0, "lora_sum": 0}  # once only
    layer = light.base_model.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.lora_A["default"], DropoutLoraA)
    assert isinstance(layer.self_attn.q_proj.lora_dropout["default"], nn.Identity)
    assert get_peft_model_state_dict(plain).keys() == get_peft_model_state_dict(light).keys()
    assert plain.state_dict().keys() == light.state_dict().keys()
    for model in (plain, light):
        nonzero_lora_b(model)
    torch.manual_seed(3)
    batch = torch.randint(0, 1000, (1, 40))
    results = []
    for model in (plain, light):
        model.train()
        torch.manual_seed(4)
        loss, saved = saved_bytes(model, batch)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), saved, grads, torch.rand(3)))
    (loss0, saved0, grads0, rng0), (loss1, saved1, grads1, rng1) = results
    assert loss1 == pytest.approx(loss0, rel=1e-5) and torch.equal(rng0, rng1)
    assert grads0.keys() == grads1.keys() and all(g is not None for g in grads1.values())
    # int8 rounding of the backward pass turns float-rounding differences into occasional one-level flips
    assert all(rel(grads1[n], grads0[n]) < 0.05 for n in grads0)
    assert saved1 < 0.4 * saved0  # measured 0.37; 0.42 with gate and up kept in bf16, more with the norms' inputs
    for model in (plain, light):
        model.eval()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=batch).logits, light(input_ids=batch).logits)



def test_int8_step_is_the_same_with_gradient_checkpointing(tiny_model_dir):
    """`--gradient_checkpointing auto` turns checkpointing on where RAM is short, which is where int8 is chosen:
    recomputing the lighter int8 layers (LoRA dropout draws, SwiGLU, RMSNorms, int8 products) in the backward
    pass gives the same loss, the same gradients and the same random stream as keeping their activations."""
    from medlora.config import TrainConfig
    from medlora.model import load_model
    from medlora.training.recipe import prepare_model

    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, _, _ = prepare_model(TrainConfig(lora_dropout=0.1, precision="int8"),
                                    load_model(str(tiny_model_dir), False), "int8")
        nonzero_lora_b(model)
        if checkpointing:
            # as the Trainer switches it on (transformers 5 renamed gradient_checkpointing_enable)
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        torch.manual_seed(4)
        batch = torch.randint(0, 1000, (1, 40))
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                        torch.rand(3)))
    (loss0, grads0, rng0), (loss1, grads1, rng1) = results
    assert loss0 == loss1 and torch.equal(rng0, rng1) and grads0.keys() == grads1.keys()
    assert all(torch.equal(grads0[n], grads1[n]) for n in grads0)


def test_int8_build_loads_bf16_checkpoints_as_stored_and_trains_in_fp32(tiny_model_dir, tmp_path, monkeypatch):
    """A checkpoint stored in bf16 (as Qwen2.5's is) is loaded in bf16 for --precision int8, which quantises it
    anyway (the build peaks near the bf16 model's size, not the fp32 one's); what stays a parameter is fp32."""
    from transformers import AutoModelForCausalLM

    from medlora.config import TrainConfig
    from medlora.training.recipe import build_model

    stored = tmp_path / "bf16-model"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(stored)
    loads = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        loads.append(model.dtype)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model, _, plan = build_model(TrainConfig(precision="int8", lora_dropout=0.0), str(stored))
    assert loads == [torch.bfloat16] and plan.precision == "int8"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # norms and LoRA
    assert isinstance(model.get_input_embeddings(), Int8Embedding)
    batch = torch.randint(0, 1000, (1, 16))
    model.train()
    model(input_ids=batch, labels=batch).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
