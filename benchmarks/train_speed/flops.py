"""Model FLOPs of one LoRA training step on the Qwen2.5-1.5B shapes (the same useful work for every contender)."""

from __future__ import annotations

from .common import QWEN25_15B


def flops_model(layers: int, gradient_checkpointing: bool, lora_r: int = 8) -> dict:
    """Per-token FLOPs of one LoRA training micro-step on the Qwen2.5-1.5B shapes (attention separate)."""
    h, inter, v = QWEN25_15B["hidden_size"], QWEN25_15B["intermediate_size"], QWEN25_15B["vocab_size"]
    kv = h // QWEN25_15B["num_attention_heads"] * QWEN25_15B["num_key_value_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # q k v o gate up down
    layer_params = sum(i * o for i, o in shapes)
    lora_params = sum(lora_r * (i + o) for i, o in shapes)
    return {"layer_linear_params": layer_params * layers, "lm_head_params": h * v,
            "lora_params": lora_params * layers, "layers": layers, "hidden": h,
            "gradient_checkpointing": gradient_checkpointing}


def training_flops(fm: dict, seq_lens: list[int], gradient_checkpointing: bool | None = None) -> dict:
    """FLOPs of training on sequences of the given lengths.

    forward  = 2*(N_layers + N_lm_head + N_lora) per token + causal attention 2*L*d*s*(s+1) per sequence
               (QK^T and AV: 2 matmuls x 2 FLOPs x d per (query, key) pair, s(s+1)/2 pairs under the causal mask)
    backward = activation gradients only for the frozen weights: 2*(N_layers + N_lm_head) per token
               + LoRA input and weight gradients 2*2*N_lora + attention backward 2x its forward
    recompute (gradient checkpointing): + the decoder layers' forward once more (not the LM head)
    'model' FLOPs = forward + backward (the useful work, identical for every contender);
    'executed' FLOPs add the recompute where the contender checkpoints.
    """
    gc = fm["gradient_checkpointing"] if gradient_checkpointing is None else gradient_checkpointing
    tokens = sum(seq_lens)
    L, d = fm["layers"], fm["hidden"]
    attn_fwd = sum(2 * L * d * s * (s + 1) for s in seq_lens)
    layers_fwd = 2 * fm["layer_linear_params"] * tokens + 2 * fm["lora_params"] * tokens + attn_fwd
    head_fwd = 2 * fm["lm_head_params"] * tokens
    fwd = layers_fwd + head_fwd
    bwd = 2 * (fm["layer_linear_params"] + fm["lm_head_params"]) * tokens + 4 * fm["lora_params"] * tokens + 2 * attn_fwd
    model = fwd + bwd
    executed = model + (layers_fwd if gc else 0)
    return {"tokens": tokens, "model_flops": model, "executed_flops": executed,
            "model_flops_per_token": model / tokens if tokens else 0.0}


FLOPS_FORMULA = " ".join(training_flops.__doc__.split())


def flops_per_token_gflop(layers: int, tokens_per_row: int) -> float:
    """Model GFLOPs per token for one sequence of ``tokens_per_row`` tokens (no checkpointing recompute)."""
    return round(training_flops(flops_model(layers, False), [tokens_per_row])["model_flops_per_token"] / 1e9, 3)
