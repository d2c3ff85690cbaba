"""`medlora export`: a run (adapter merged in memory), a merged folder or an HF model folder as one GGUF file for
llama.cpp and Ollama, with an Ollama Modelfile beside it.

Written on the ``gguf`` package (GGUFWriter, its tensor-name map and quantizers) for the two architectures
medlora fine-tunes: ``llama`` (SmolLM2) and ``qwen2`` (Qwen2.5: tied embeddings, q/k/v biases). What llama.cpp
expects and this module therefore does:

* Llama's q/k projection rows are reordered (``_permute_qk``): HF checkpoints rotate the two halves of each head
  (rotate_half), llama.cpp's LLAMA rope rotates adjacent pairs. Qwen2 uses llama.cpp's NEOX rope: no reordering.
* 1-D tensors (norms, biases) stay f32; 2-D weights are f16, q8_0 or q4_0.
* q4_0 is a mixture with importance-weighted blocks, as llama.cpp's quantizer makes with an importance matrix:
  - q8_0 for the token embedding (also the output layer when tied), every attn_v, and ffn_down of the first and
    last layers (``_q4_0_keeps_q8_0``): 4.8% of SmolLM2-135M's quantized weights; 94.3 MB against 91.7 MB all
    q4_0 (q8_0: 144.8 MB).
  - the others: each block's scale minimises the squared error weighted by how strongly each input channel is
    driven (``_q4_0_weighted``: llama.cpp's quantize_row_q4_0_impl/make_qx_quants). The weights come from a
    calibration pass (``activation_importance``: mean squared input of every linear layer) over the first 8
    training rows of the run's own split (never its eval rows); a model folder without a run, or a run whose
    data file is gone, is calibrated on the repository's bundled sample CSV (``calibration_tokens``).
  Measured: teacher-forced answer-token loss through llama.cpp against transformers' fp32 on the first 5 eval
  rows of fine-tuned SmolLM2-135M runs on the bundled sample (its published weights are 4-bit Q4_1, so q4_0
  quantizes them a second time onto another grid). The tests' run (12 steps at lr 1e-3): q8_0 +0.23%; q4_0
  round-to-nearest +10.1%, weighted +5.8%, round-to-nearest with the mixture +7.1%, as written (weighted and
  the mixture) +3.1%. A 30-step run at lr 3e-4: q8_0 +0.15%; q4_0 round-to-nearest +10.7%, weighted +6.1 to
  6.3%, weighted with only attn_v in q8_0 +4.2 to 4.6%, as written +3.3% (+3.1 to 3.5% calibrated on 4 to 32
  rows, or on data/general/instructions.csv instead). Not kept: GPTQ-style error compensation (+6.6% on 8
  rows, minutes), a finer scale search (72 candidates: no gain; llama.cpp's 19 and the 7 here: equal), q8_0
  for the whole first and last layers (+2.6 to 2.8%, 96.8 MB).
  Time (AMD EPYC, 2 cores shared with other work, so only indicative): exporting the 135M run takes 21-24 s in
  q4_0 (calibration 9 s; writing 6 s, of which 4 s the weighted quantization of 101M weights) against 14-20 s
  in q8_0, loading and merging included; a 1.5B model has about 12x the weights and calibration work
  (estimate, not measured: about 1 minute of quantization and 2 of calibration at that speed).
* The byte-level BPE tokenizer is written as tokenizer.ggml.model "gpt2" with the pre-tokenizer llama.cpp must
  use to split text the way the HF tokenizer does (``_pre_tokenizer``), plus the chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import MedloraError, log
from ..prompts import DEFAULT_SYSTEM_PROMPT
from ..rundir import EXPORT, MODELFILE, RunDir

QUANTS = ("f16", "q8_0", "q4_0")


class NotExportable(MedloraError):
    """The model or tokenizer is of a kind this converter does not write (llama.cpp cannot run it from here)."""


DEFAULT_QUANT = "q8_0"
ARCHITECTURES = ("llama", "qwen2")  # HF config.model_type values this converter writes


def _gguf():
    try:
        import gguf
    except ImportError:
        raise NotExportable("medlora export needs the gguf package: pip install gguf") from None
    return gguf


# ---------------------------------------------------------------- hyperparameters

def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise NotExportable(f"rope scaling {kind!r} is not supported by medlora export (only plain rope)")
    theta = getattr(config, "rope_theta", None) or params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _write_hparams(writer, config, name: str, file_type) -> None:
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_kv))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)


# ---------------------------------------------------------------- tensors

def _permute_qk(w, n_head: int):
    """HF Llama q/k rows (per head: first half, second half of the rotary pairs) in llama.cpp's order
    (per head: pairs interleaved). Works on weights (rows x cols) and biases (rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, arch: str) -> list:
    """(HF name, fp32 array) in GGUF order: the tied lm_head left out, Llama's q/k reordered."""
    import numpy as np

    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    out = []
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        a = t.detach().to("cpu").float().numpy()
        if arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            a = _permute_qk(a, n_head)
        elif arch == "llama" and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            a = _permute_qk(a, n_kv)
        out.append((name, np.ascontiguousarray(a)))
    return out


def _q4_0_keeps_q8_0(gguf_name: str, n_layers: int | None) -> bool:
    """The tensors a q4_0 file keeps in q8_0 (about 5% of SmolLM2-135M's quantized weights, +2.8% file size):
    the token embedding (also the output layer when tied) and an untied output layer, as llama.cpp keeps the
    output at higher precision; every attn_v (with grouped-query attention it is n_head/n_kv times smaller than
    attn_q, and its error reaches every head of its group: llama.cpp raises it too); ffn_down of the first and
    the last layer (llama.cpp's Q4_K_M raises ffn_down most at both ends of the stack)."""
    if gguf_name in ("token_embd.weight", "output.weight") or gguf_name.endswith(".attn_v.weight"):
        return True
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] == "ffn_down" and parts[1].isdigit():
        return int(parts[1]) == 0 or (n_layers is not None and int(parts[1]) == n_layers - 1)
    return False


def _encode_tensor(gguf, gguf_name: str, a, quant: str, importance=None, n_layers: int | None = None):
    """(data, raw_dtype) for GGUFWriter.add_tensor. ``importance``: this weight's per-input-channel mean squared
    activation (``activation_importance``); q4_0 weights are then quantized to minimise the squared error it
    weights (``_q4_0_weighted``), else rounded to nearest as gguf/llama.cpp do without an importance matrix.
    ``n_layers``: the model's layer count (which ffn_down is the last layer's)."""
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if a.ndim < 2:
        return a.astype(np.float32), None
    qtype = {"f16": None, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    if quant == "q4_0" and _q4_0_keeps_q8_0(gguf_name, n_layers):
        qtype = Q.Q8_0
    if qtype is not None:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if a.shape[-1] % block == 0:
            if qtype == Q.Q4_0 and importance is not None and a.ndim == 2:
                return _q4_0_weighted(a, importance), qtype
            return gguf.quants.quantize(a, qtype), qtype
    return a.astype(np.float16), None  # rows not a multiple of the block size: f16, as llama.cpp does


# ---------------------------------------------------------------- q4_0 weighted by activations (imatrix)

Q4_0_BLOCK = 32
# Candidate scales -max/(8 + step). llama.cpp's make_qx_quants tries steps 0.1 k, k = 0, -9..9; every third of
# them gave the same loss on SmolLM2-135M (+3.30% both) in a third of the time.
_Q4_0_STEPS = (0.0, -0.3, -0.6, -0.9, 0.3, 0.6, 0.9)


def _pack_q4_0(d, q):
    """GGML's block_q4_0 for blocks of 32 values: the fp16 scale d, then 16 bytes of 4-bit codes (low nibbles:
    values 0-15, high nibbles: 16-31); value = d * (q - 8). d (n,), q (n, 32) in 0..15 -> (n, 18) uint8."""
    import numpy as np

    q = q.astype(np.uint8)
    nibbles = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return np.concatenate([np.asarray(d, np.float16).reshape(-1, 1).view(np.uint8), nibbles], axis=1)


def _q4_0_weighted(a, importance, chunk: int = 2048):
    """``a`` (rows, cols) as q4_0 bytes (rows, cols / 32 * 18), each block's scale chosen as llama.cpp's
    quantize_row_q4_0_impl does with an importance matrix (make_qx_quants): weights w_j = importance_j *
    sqrt(sigma2 + x_j^2) (sigma2: the row's mean square); for each candidate scale -max/(8 + step) the codes by
    rounding, then the weighted least-squares scale for those codes; kept: the candidate with the least weighted
    squared error. Vectorised over blocks, ``chunk`` blocks at a time (their arrays stay in cache)."""
    import numpy as np

    a = np.asarray(a, np.float32)
    rows, cols = a.shape
    per_row = cols // Q4_0_BLOCK
    imp = np.asarray(importance, np.float32).reshape(per_row, Q4_0_BLOCK)
    imp = np.maximum(imp, np.float32(1e-6) * max(float(imp.mean()), 1e-30))  # a channel calibration never fed
    sigma2 = np.repeat((a * a).mean(axis=1), per_row)
    blocks = a.reshape(-1, Q4_0_BLOCK)
    out = np.empty((len(blocks), 2 + Q4_0_BLOCK // 2), np.uint8)
    for start in range(0, len(blocks), chunk):
        x = blocks[start:start + chunk]
        n = len(x)
        w = imp[np.arange(start, start + n) % per_row] * np.sqrt(sigma2[start:start + n, None] + x * x)
        wx = w * x
        mx = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]  # largest magnitude, signed
        mx = np.where(mx == 0, np.float32(1), mx)  # an all-zero block: codes 8, scale 0
        best = np.full(n, -np.inf, np.float32)
        d, iscale = np.zeros(n, np.float32), np.zeros(n, np.float32)
        l, wl = np.empty_like(x), np.empty_like(x)
        for step in _Q4_0_STEPS:
            s = np.float32(-(8 + step)) / mx
            np.multiply(x, s[:, None], out=l)
            np.rint(l, out=l)
            np.clip(l, -8, 7, out=l)
            sumlx = np.einsum("ij,ij->i", wx, l)
            np.multiply(w, l, out=wl)
            suml2 = np.einsum("ij,ij->i", wl, l)
            ok = suml2 > 0
            fit = sumlx / np.where(ok, suml2, np.float32(1))  # the best scale for these codes
            score = np.where(ok, fit * sumlx, -np.inf)  # how much weighted squared error it removes
            better = score > best
            best = np.where(better, score, best)
            d = np.where(better, fit, d)
            iscale = np.where(better, s, iscale)
        np.multiply(x, iscale[:, None], out=l)
        codes = np.clip(np.rint(l, out=l), -8, 7) + 8
        out[start:start + n] = _pack_q4_0(d, codes)
    return out.reshape(rows, -1)


def activation_importance(model, token_lists, progress: bool = False) -> dict:
    """llama.cpp's importance matrix: for every linear layer (the output layer left out) the mean over all
    calibration tokens of its squared input, per input channel, keyed by the weight's HF name. Run with the
    threads the llama.cpp backend would take (the free cores): torch's OpenMP threads also spin while they
    wait (measured on a busy 2-core machine: 1.1 s a row with 1 thread, 10 s with 2)."""
    import torch
    from tqdm.auto import tqdm

    from ..inference.llamacpp import default_threads

    sums, counts, hooks = {}, {}, []

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            hooks.append(module.register_forward_pre_hook(hook(f"{name}.weight")))
    decoder = getattr(model, "base_model", model)  # no output layer: its input is not needed
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, default_threads())))
    try:
        with torch.inference_mode():
            for ids in tqdm(token_lists, desc="calibrating", unit="row", disable=not progress):
                decoder(input_ids=torch.tensor([list(ids)]))
    finally:
        torch.set_num_threads(threads)
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}


CALIBRATION_ROWS = 8  # q4_0: this many training rows (~1,800 SmolLM2 tokens) through the merged model
SAMPLE_CSV = Path(__file__).resolve().parents[3] / "data" / "sample_medical_qa.csv"  # the repository's sample


def calibration_tokens(run: RunDir | None, tokenizer, rows: int = CALIBRATION_ROWS) -> tuple[list, str]:
    """(token id lists, where they come from) to calibrate q4_0 on: the first ``rows`` training rows of the run's
    own split (never its eval rows), in its chat format; for a model without a run (or a run whose data file is
    gone), the repository's bundled sample CSV. ([], reason) when neither can be read."""
    from ..config import TrainConfig
    from ..data import encode_frame, load_qa_csv, split

    cfg, source = None, None
    if run is not None and run.is_finished_run():
        try:
            cfg = run.read_config()
            path = run.data_path(cfg)
            train, _ = split(load_qa_csv(path)[0], cfg.test_size, cfg.seed)
            df, source = train.head(min(rows, cfg.max_train_samples or rows)), f"the run's training rows ({path})"
        except MedloraError as e:
            log(f"q4_0 calibration: cannot read the run's training rows ({e}); using the bundled sample")
    if source is None:
        if not SAMPLE_CSV.is_file():
            return [], f"{SAMPLE_CSV} is not present"
        cfg = cfg or TrainConfig()
        df = load_qa_csv(SAMPLE_CSV)[0].head(rows)
        source = f"the bundled sample {SAMPLE_CSV.name} (no run data)"
    examples = encode_frame(tokenizer, df, cfg.system_prompt, cfg.max_seq_len).examples
    return [ex["input_ids"] for ex in examples], f"{len(examples)} rows of {source}"


# ---------------------------------------------------------------- tokenizer

# The split patterns of the tokenizers llama.cpp knows by name; the pre-tokenizer tells llama.cpp which to use.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's name for the way this byte-level BPE tokenizer splits text before BPE. Anything else is
    refused: a wrong name makes llama.cpp tokenize differently from the model's training, silently."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # the GPT-2 split (SmolLM2 as transformers rebuilds it from the bundled GGUF)
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # GPT-2 split with single digits: SmolLM/SmolLM2 as published
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True) \
            and (parts[0].get("pattern") or {}).get("Regex") == _QWEN2_SPLIT:
        return "qwen2"
    raise NotExportable(f"unsupported tokenizer pre-tokenizer ({'+'.join(map(str, kinds)) or 'none'}); medlora "
                       "export knows the SmolLM2 and Qwen2.5 tokenizers")


def _write_tokenizer(gguf, writer, tokenizer, vocab_size: int) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NotExportable("medlora export needs a fast (tokenizer.json) tokenizer")
    tok_json = json.loads(backend.to_str())
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise NotExportable(f"unsupported tokenizer ({model.get('type')}); medlora export writes byte-level BPE "
                           "tokenizers (SmolLM2, Qwen2.5)")
    pre = _pre_tokenizer(tok_json)
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise NotExportable(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embeddings")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(T.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    for kind, i in ids.items():
        if i is not None:
            getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                             "pad": "add_pad_token_id"}[kind])(int(i))
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(ids["bos"] is not None and probe[:1] == [ids["bos"]])
    writer.add_add_eos_token(ids["eos"] is not None and len(probe) > 1 and probe[-1] == ids["eos"])
    template = tokenizer.chat_template
    if not isinstance(template, str):
        raise NotExportable("medlora export needs the tokenizer's chat template (one template string)")
    writer.add_chat_template(template)


# ---------------------------------------------------------------- the file

def write_gguf(model, tokenizer, out: Path, quant: str = DEFAULT_QUANT, name: str | None = None,
               progress: bool = True, importance: dict | None = None) -> Path:
    """Write ``model`` (fp32, HF, llama or qwen2) and ``tokenizer`` to ``out`` (tmp file, then renamed).
    ``importance``: ``activation_importance`` of the model, used by q4_0 (without it, plain round-to-nearest)."""
    gguf = _gguf()
    if quant not in QUANTS:
        raise MedloraError(f"unknown quantization {quant!r}; choose {', '.join(QUANTS)}")
    config = model.config
    arch = getattr(config, "model_type", None)
    if arch not in ARCHITECTURES:
        raise NotExportable(f"medlora export supports {' and '.join(ARCHITECTURES)} models, not {arch!r}")
    if getattr(config, "use_sliding_window", False):
        raise NotExportable("sliding-window attention is not supported by medlora export")
    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    names = gguf.get_tensor_name_map(model_arch, int(config.num_hidden_layers))
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # two processes exporting at once never share a file
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[model_arch])
    try:
        _write_hparams(writer, config, name or out.stem, file_type)
        _write_tokenizer(gguf, writer, tokenizer, int(config.vocab_size))
        from tqdm.auto import tqdm

        hf_tensors = _tensors(model, arch)
        for hf_name, a in tqdm(hf_tensors, desc=f"converting to {quant}", unit="tensor", disable=not progress):
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise NotExportable(f"cannot map tensor {hf_name} to a GGUF name")
            data, raw_dtype = _encode_tensor(gguf, gguf_name, a, quant, (importance or {}).get(hf_name),
                                             int(config.num_hidden_layers))
            writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


# ---------------------------------------------------------------- Ollama

_CHATML_TEMPLATE = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                    '{{ end }}<|im_start|>assistant\n')


def modelfile_text(gguf_file: str, chat_template: str, system_prompt: str, vocab: dict) -> str:
    """An Ollama Modelfile: the GGUF, the chat format as a Go template (ChatML), the run's system prompt, the
    stop tokens and medlora's sampling preset."""
    from ..inference.backend import PRESETS

    if '"""' in system_prompt:
        raise MedloraError(f'the system prompt contains """, which an Ollama {MODELFILE} cannot quote')
    lines = [f"FROM ./{gguf_file}"]
    if "<|im_start|>" in chat_template and "<|im_end|>" in vocab:
        lines.append(f'TEMPLATE """{_CHATML_TEMPLATE}"""')
    else:
        log(f"the chat template is not ChatML; the {MODELFILE} leaves the template to Ollama (it reads the GGUF's)")
    lines.append(f'SYSTEM """{system_prompt}"""')
    for stop in ("<|im_end|>", "<|endoftext|>"):
        if stop in vocab:
            lines.append(f'PARAMETER stop "{stop}"')
    sample = PRESETS["sample"]
    lines += [f"PARAMETER temperature {sample.temperature}", f"PARAMETER top_p {sample.top_p}",
              f"PARAMETER repeat_penalty {sample.repetition_penalty}",
              f"PARAMETER num_predict {sample.max_new_tokens}"]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, tokenizer, system_prompt: str) -> Path:
    path = gguf_path.with_name(MODELFILE)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(modelfile_text(gguf_path.name, tokenizer.chat_template or "", system_prompt,
                                  tokenizer.get_vocab()), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- what to export

def export(target: str | Path, quant: str = DEFAULT_QUANT, output: str | Path | None = None,
           trust_remote_code: bool = False, progress: bool = True, modelfile: bool = True,
           announce: str | None = None) -> Path:
    """Export a run folder (its adapter merged in memory), its merged_model/ or any HF model folder. Default
    output: RUN/export/RUN-QUANT.gguf (for a plain model folder, FOLDER/export/FOLDER-QUANT.gguf)."""
    from ..model import load_model, load_run_model, load_tokenizer

    if quant not in QUANTS:
        raise MedloraError(f"unknown quantization {quant!r}; choose {', '.join(QUANTS)}")
    path = Path(target)
    if not path.is_dir():
        raise MedloraError(f"{path}: no such folder")
    run = RunDir(path)
    if run.is_finished_run():
        peft_model, tokenizer, _ = load_run_model(run, trust_remote_code=trust_remote_code)
        model = peft_model.merge_and_unload()
        home, prompt = run, run.system_prompt() or DEFAULT_SYSTEM_PROMPT
    elif (path / "config.json").is_file():
        model, tokenizer = load_model(str(path), trust_remote_code), load_tokenizer(str(path), trust_remote_code)
        home, prompt = RunDir(path), DEFAULT_SYSTEM_PROMPT
        if RunDir.is_merged_model(path):
            home = RunDir(path.parent)
            prompt = home.system_prompt() or prompt
    else:
        raise run.not_a_run(" nor a model folder (no config.json)")
    if announce:  # once the model has loaded: a model that cannot load reports that alone, in one line
        log(announce)
    name = home.path.resolve().name
    out = Path(output) if output else home.path / EXPORT / f"{name}-{quant}.gguf"
    if out.is_dir():
        raise MedloraError(f"--output {out} is a folder; give a file name (NAME.gguf)")
    importance = None
    if quant == "q4_0":
        tokens, source = calibration_tokens(home if home.is_finished_run() else None, tokenizer)
        if tokens:
            log(f"q4_0: weighting the quantization error by activations on {source}")
            importance = activation_importance(model, tokens, progress)
        else:
            log(f"q4_0: no calibration data ({source}); plain round-to-nearest q4_0")
    write_gguf(model, tokenizer, out, quant, name=name, progress=progress, importance=importance)
    if modelfile:
        write_modelfile(out, tokenizer, prompt)
    return out


def _newest_mtime(folder: Path) -> float:
    return max((f.stat().st_mtime for f in folder.rglob("*") if f.is_file()), default=0.0)


def cached_export(target: str | Path | None, quant: str = DEFAULT_QUANT, model: str | None = None,
                  trust_remote_code: bool = False) -> Path:
    """The GGUF that the llama.cpp backend runs for ``target``, exported on first use and reused after:

    * a run folder: RUN/export/RUN-QUANT.gguf, the file `medlora export` writes (exported again when the adapter
      is newer than it, e.g. after --resume trained on);
    * a run's merged model: the same file as its run;
    * any other HF model folder, or (``target`` None) the base model ``model`` by name: a file in medlora's
      cache, so a user's model folder is never written to.
    """
    from ..model import cache_dir, resolve_model

    if target is None:
        if model is None:
            raise MedloraError("give a run folder or --model")
        folder = Path(resolve_model(model))
        if not (folder / "config.json").is_file():
            raise NotExportable(f"{model}: not a local model folder, cannot export it to GGUF")
    else:
        folder = Path(target)
        run = RunDir(folder.parent if RunDir.is_merged_model(folder) else folder)
        if run.is_finished_run():
            name = run.path.resolve().name
            out = run.path / EXPORT / f"{name}-{quant}.gguf"
            if not out.is_file() or out.stat().st_mtime < _newest_mtime(run.adapter_dir):
                export(run.path, quant, out, trust_remote_code, announce=f"exporting {run.path} to {out} for "
                       "llama.cpp (once; `medlora export` writes the same file)")
            return out
    resolved = folder.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:10]
    out = cache_dir() / "gguf" / f"{resolved.name}-{digest}-{quant}.gguf"
    if not out.is_file() or out.stat().st_mtime < _newest_mtime(resolved):
        export(resolved, quant, out, trust_remote_code, modelfile=False,
               announce=f"exporting {resolved} to {out} for llama.cpp (once)")
    return out
