"""`medlora export --quant q4_0`: which tensors stay q8_0, and q4_0 blocks weighted by activations.

q4_0 is a mixture with importance-weighted blocks, as llama.cpp's quantizer makes with an importance matrix:
- q8_0 for the token embedding (also the output layer when tied), every attn_v, and ffn_down of the first and
  last layers (``keeps_q8_0``): 4.8% of SmolLM2-135M's quantized weights; 94.3 MB against 91.7 MB all
  q4_0 (q8_0: 144.8 MB).
- the others: each block's scale minimises the squared error weighted by how strongly each input channel is
  driven (``q4_0_weighted``: llama.cpp's quantize_row_q4_0_impl/make_qx_quants). The weights come from a
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

Written by hand because the ``gguf`` package only rounds to nearest (``gguf.quants.quantize``) and has no
importance-matrix quantizer; llama.cpp's own (``llama-quantize --imatrix``) is a C++ tool that is not on PyPI.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MedloraError, log
from ..rundir import RunDir


def keeps_q8_0(gguf_name: str, n_layers: int | None) -> bool:
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


def q4_0_weighted(a, importance, chunk: int = 2048):
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
    from ..progress import bar

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
            for ids in bar(token_lists, desc="calibrating", unit="row", disable=not progress):
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
