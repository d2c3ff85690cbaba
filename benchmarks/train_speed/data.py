"""The benchmark's rows: a seeded selection of MedQuAD, tokenised by medlora.data.encode_frame (parent side)."""

from __future__ import annotations

import json
from pathlib import Path

SAMPLER_SEED = 42  # every batch-1 contender's Trainer seed, hence the same row order


def select_rows(args, n_rows: int, tok) -> tuple[list[dict], list[dict], dict]:
    """The first ``n_rows`` rows of a seeded permutation whose prompt fits --seq, encoded with answer-only labels:
    (rows, features, stats: lens, prompt_lens, truncated, rows_usable)."""
    import numpy as np

    from medlora.data import encode_frame, load_qa_csv
    from medlora.prompts import DEFAULT_SYSTEM_PROMPT

    df, report = load_qa_csv(args.data)
    order = np.random.default_rng(args.data_seed).permutation(len(df))
    rows, feats, lens, prompt_lens, truncated = [], [], [], [], 0
    for i in order:
        one = df.iloc[[int(i)]]
        enc = encode_frame(tok, one, DEFAULT_SYSTEM_PROMPT, args.seq)
        if not enc.examples:  # prompt alone longer than --seq
            continue
        ex = enc.examples[0]
        rows.append({"question": one["Question"].iloc[0], "answer": one["Answer"].iloc[0], "csv_row": int(i)})
        feats.append({k: ex[k] for k in ("input_ids", "attention_mask", "labels")})
        lens.append(len(ex["input_ids"]))
        prompt_lens.append(ex["prompt_len"])
        truncated += bool(ex["truncated"])
        if len(rows) == n_rows:
            break
    stats = {"lens": lens, "prompt_lens": prompt_lens, "truncated": truncated, "rows_usable": report.rows_kept}
    return rows, feats, stats


def prepare_data(args, n_rows: int, workdir: Path) -> tuple[Path, dict]:
    """Write the rows and run settings for the children (spec.json); return its path and a data summary."""
    from medlora.model import load_tokenizer, smollm2_folder
    from medlora.prompts import DEFAULT_SYSTEM_PROMPT

    tok_dir = str(smollm2_folder())
    rows, feats, stats = select_rows(args, n_rows, load_tokenizer(tok_dir))
    lens, prompt_lens = stats["lens"], stats["prompt_lens"]
    spec = {"rows": rows, "features": feats, "tokenizer_dir": tok_dir, "system_prompt": DEFAULT_SYSTEM_PROMPT,
            "seq": args.seq, "layers": args.layers, "steps": args.steps, "warmup": args.warmup,
            "grad_accum": args.grad_accum, "seed": SAMPLER_SEED}
    path = workdir / "spec.json"
    path.write_text(json.dumps(spec))
    summary = {
        "csv": str(Path(args.data).resolve()), "csv_rows_usable": stats["rows_usable"], "rows_selected": len(rows),
        "selection": f"first {len(rows)} rows of np.random.default_rng({args.data_seed}).permutation(usable rows) "
                     f"whose prompt fits --seq",
        "tokenizer": "bundled SmolLM2-135M-Instruct (medlora.model.smollm2_folder)",
        "tokens_per_row_mean": round(sum(lens) / len(lens), 1), "tokens_per_row_min": min(lens),
        "tokens_per_row_max": max(lens), "prompt_tokens_mean": round(sum(prompt_lens) / len(prompt_lens), 1),
        "answers_truncated_at_seq": stats["truncated"],
    }
    return path, summary
