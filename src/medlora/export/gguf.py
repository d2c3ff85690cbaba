"""The GGUF file `medlora export` writes for llama.cpp and Ollama (what to export and where: ``exporter.py``; the
Ollama Modelfile beside it: ``modelfile.py``), and the system prompt read back from it.

Written on the ``gguf`` package (GGUFWriter, its tensor-name map and quantizers) for the two architectures
medlora fine-tunes: ``llama`` (SmolLM2) and ``qwen2`` (Qwen2.5: tied embeddings, q/k/v biases). What llama.cpp
expects and this module therefore does:

* Llama's q/k projection rows are reordered (``_permute_qk``): HF checkpoints rotate the two halves of each head
  (rotate_half), llama.cpp's LLAMA rope rotates adjacent pairs. Qwen2 uses llama.cpp's NEOX rope: no reordering.
* 1-D tensors (norms, biases) stay f32; 2-D weights are f16, q8_0 or q4_0.
* q4_0 is a mixture with importance-weighted blocks, as llama.cpp's quantizer makes with an importance matrix
  (``q4_0.py``: what it does, why, and what it measured).
* The byte-level BPE tokenizer is written as tokenizer.ggml.model "gpt2" with the pre-tokenizer llama.cpp must
  use to split text the way the HF tokenizer does (``_pre_tokenizer``), plus the chat template.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

from ..errors import MedloraError
from ..rundir import EXPORT, RunDir
from .q4_0 import keeps_q8_0, q4_0_weighted

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


def _encode_tensor(gguf, gguf_name: str, a, quant: str, importance=None, n_layers: int | None = None):
    """(data, raw_dtype) for GGUFWriter.add_tensor. ``importance``: this weight's per-input-channel mean squared
    activation (``q4_0.activation_importance``); q4_0 weights are then quantized to minimise the squared error it
    weights (``q4_0.q4_0_weighted``), else rounded to nearest as gguf/llama.cpp do without an importance matrix.
    ``n_layers``: the model's layer count (which ffn_down is the last layer's)."""
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if a.ndim < 2:
        return a.astype(np.float32), None
    qtype = {"f16": None, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    if quant == "q4_0" and keeps_q8_0(gguf_name, n_layers):
        qtype = Q.Q8_0
    if qtype is not None:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if a.shape[-1] % block == 0:
            if qtype == Q.Q4_0 and importance is not None and a.ndim == 2:
                return q4_0_weighted(a, importance), qtype
            return gguf.quants.quantize(a, qtype), qtype
    return a.astype(np.float16), None  # rows not a multiple of the block size: f16, as llama.cpp does


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

SYSTEM_PROMPT_KEY = "medlora.system_prompt"  # our own key: GGUF has none for a default system prompt


def gguf_system_prompt(path: Path) -> str | None:
    """The system prompt a medlora export keeps in the file, else (an older export, another tool's GGUF) the
    prompt of the run whose export/ folder holds it, else None."""
    prompt = _read_early_string(Path(path), SYSTEM_PROMPT_KEY)
    if prompt is not None:
        return prompt
    path = Path(path)
    if path.parent.name == EXPORT:
        run = RunDir(path.parent.parent)
        if run.is_finished_run():
            return run.system_prompt()
    return None


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> size
_STRING = 8


def _read_early_string(path: Path, key: str) -> str | None:
    """A string value among a GGUF file's first key/value pairs, where write_gguf puts SYSTEM_PROMPT_KEY.
    Written by hand because gguf.GGUFReader parses every tensor and vocabulary entry first (2.6 s for the 135M
    model's file); this stops at the first array (the vocabulary comes after our key) and reads a few bytes."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or struct.unpack("<I", f.read(4))[0] < 2:
                return None
            _, n_kv = struct.unpack("<QQ", f.read(16))
            for _ in range(min(n_kv, 64)):
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 1024:
                    return None
                name = f.read(n)
                (vtype,) = struct.unpack("<I", f.read(4))
                if vtype == _STRING:
                    (n,) = struct.unpack("<Q", f.read(8))
                    if n > 1 << 20:
                        return None
                    value = f.read(n)
                    if name == key.encode():
                        return value.decode("utf-8")
                elif vtype in _SCALAR_BYTES:
                    f.seek(_SCALAR_BYTES[vtype], os.SEEK_CUR)
                else:  # an array: past the early metadata
                    return None
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None


def write_gguf(model, tokenizer, out: Path, quant: str = DEFAULT_QUANT, name: str | None = None,
               progress: bool = True, importance: dict | None = None, system_prompt: str | None = None) -> Path:
    """Write ``model`` (fp32, HF, llama or qwen2) and ``tokenizer`` to ``out`` (tmp file, then renamed).
    ``importance``: ``activation_importance`` of the model, used by q4_0 (without it, plain round-to-nearest).
    ``system_prompt``: the run's, kept in the file (SYSTEM_PROMPT_KEY) so that chat and serve on the .gguf
    alone, wherever it is copied, answer under it."""
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
    made = not out.parent.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # two processes exporting at once never share a file
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[model_arch])
    try:
        if system_prompt:  # first, where gguf_system_prompt finds it without reading the vocabulary
            writer.add_string(SYSTEM_PROMPT_KEY, system_prompt)
        _write_hparams(writer, config, name or out.stem, file_type)
        _write_tokenizer(gguf, writer, tokenizer, int(config.vocab_size))
        from ..progress import bar

        hf_tensors = _tensors(model, arch)
        for hf_name, a in bar(hf_tensors, desc=f"converting to {quant}", unit="tensor", disable=not progress):
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
    except BaseException as e:
        try:
            writer.close()
        except OSError:
            pass
        tmp.unlink(missing_ok=True)
        if made:  # the folder this call made, left empty
            with contextlib.suppress(OSError):
                out.parent.rmdir()
        if isinstance(e, OSError):  # a full disk, a folder made read-only meanwhile: one line, nothing half-written
            raise MedloraError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    return out
