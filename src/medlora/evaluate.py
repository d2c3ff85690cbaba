"""`medlora eval`: a fine-tuned run against its base model, on the same rows.

Answer-token loss and perplexity on the run's own eval split (reproduced from its config.yaml), ROUGE-L F1
of greedy answers on train and eval rows, and side-by-side answers; written to report.md, report.html
and metrics.json.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import MedloraError, TrainConfig, build_config
from .data import encode_frame, load_qa_csv, split
from .generate import answer, generation_kwargs, is_run_dir, load_for_inference, run_info

MODELS = ("base", "fine_tuned")
LABELS = {"base": "base", "fine_tuned": "fine-tuned"}
ROUGE_CAVEAT = ("ROUGE is not a medical correctness metric: use it only as a quick signal and always "
                "review the answers themselves.")
# Heuristic thresholds for the specification's "train >> eval" and "both low" readings of ROUGE-L F1.
OVERFIT_GAP = 0.10
LOW_ROUGE = 0.20


def log(msg: str) -> None:
    print(f"medlora: {msg}", file=sys.stderr, flush=True)


def _bar(**kw):
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, **kw)


# ---------------------------------------------------------------- run and rows

def open_run(run_dir: str | Path) -> TrainConfig:
    """The run's saved configuration; a clear error for anything that is not a run folder."""
    path = Path(run_dir)
    if not path.is_dir():
        raise MedloraError(f"{path}: no such folder")
    if not is_run_dir(path):
        raise MedloraError(f"{path}: not a medlora run (no adapter/ and config.yaml, as written by medlora train)")
    return build_config(yaml_path=str(path / "config.yaml"))


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_f1(prediction: str, reference: str) -> float:
    """Google's rouge-score ROUGE-L F1 (with Porter stemming), symmetric in its two arguments."""
    return _scorer().score(reference, prediction)["rougeL"].fmeasure


@dataclass
class Rows:
    source: str                      # where the rows come from, for the report
    loss: pd.DataFrame               # rows for eval loss and perplexity
    rouge: dict[str, pd.DataFrame]   # split name -> rows to generate answers for


def _sha256(path: Path) -> str:
    from .train import file_sha256

    return file_sha256(path)


def run_data_path(cfg: TrainConfig, info: dict) -> Path:
    """The training CSV: config.yaml's path (as given), else run_info.json's absolute one."""
    for candidate in (cfg.data, info.get("data")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    what = f"the run's data file {cfg.data} is not found" if cfg.data else "config.yaml names no data file"
    raise MedloraError(f"{what}; pass --data FILE.csv (the same file reproduces the run's split, "
                       "any other is evaluated whole)")


def select_rows(cfg: TrainConfig, run_dir: str | Path, data: str | None, samples: int,
                max_eval_samples: int | None) -> Rows:
    """The run's split, reproduced from its saved file, test_size and seed; or another CSV, whole."""
    info = run_info(run_dir)
    expected = info.get("data_sha256")
    path = Path(data) if data else run_data_path(cfg, info)
    df, _ = load_qa_csv(path)
    digest = _sha256(path) if expected else None
    if data is None or (expected and digest == expected):  # the run's own file, possibly moved: its split
        if digest != expected:
            log(f"warning: {path} has changed since training (sha256 differs from run_info.json); "
                "the reproduced split may not be the run's")
        train_df, eval_df = split(df, cfg.test_size, cfg.seed)
        train_df = train_df.head(cfg.max_train_samples or len(train_df))  # only rows training could have seen
        return Rows(f"{path} (the run's split: test_size {cfg.test_size}, seed {cfg.seed})",
                    eval_df.head(max_eval_samples or len(eval_df)),
                    {"train": train_df.head(samples), "eval": eval_df.head(samples)})
    # Shuffled with the run's seed so N rows are a mix of question types, not the file's first block.
    df = df.iloc[np.random.default_rng(cfg.seed).permutation(len(df))].reset_index(drop=True)
    return Rows(str(path), df.head(max_eval_samples or len(df)), {"data": df.head(samples)})


# ---------------------------------------------------------------- measurements

def adapter(model, enabled: bool):
    """Context in which a PeftModel runs with (fine-tuned) or without (base) its LoRA weights."""
    return nullcontext() if enabled else model.disable_adapter()


def answer_losses(model, tokenizer, df: pd.DataFrame, cfg: TrainConfig, desc: str) -> list[float]:
    """Mean loss on the answer tokens of each row (prompt labels -100), as training's evaluation does."""
    enc = encode_frame(tokenizer, df, cfg.system_prompt, cfg.max_seq_len)
    if not enc.examples:
        raise MedloraError(f"no eval row fits max_seq_len={cfg.max_seq_len}")
    losses = []
    with torch.inference_mode():
        for ex in _bar(iterable=enc.examples, desc=desc, unit="row", leave=False):
            out = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
            losses.append(out.loss.item())
    return losses


def generate_answers(loaded, rouge_rows: dict[str, pd.DataFrame], gen: dict) -> list[dict]:
    """Greedy answers of both models for every row, with ROUGE-L F1 against the reference."""
    jobs = [(name, q, ref) for name, df in rouge_rows.items() for q, ref in zip(df["Question"], df["Answer"])]
    bar = _bar(total=len(jobs) * len(MODELS), desc="generating", unit="answer")
    items = []
    for split_name, question, reference in jobs:
        item = {"split": split_name, "question": question, "reference": reference}
        for name in MODELS:
            bar.set_postfix_str(f"{split_name} row, {LABELS[name]}")
            with adapter(loaded.model, name == "fine_tuned"):
                item[name] = answer(loaded, question, gen)
            item[f"rouge_l_{name}"] = round(rouge_l_f1(item[name], reference), 4)
            bar.update()
        items.append(item)
    bar.close()
    return items


def rouge_summary(items: list[dict]) -> dict:
    out = {}
    for split_name in dict.fromkeys(i["split"] for i in items):
        rows = [i for i in items if i["split"] == split_name]
        out[split_name] = {"rows": len(rows),
                           **{m: round(float(np.mean([r[f"rouge_l_{m}"] for r in rows])), 4) for m in MODELS}}
    return out


def interpret(loss: dict, rouge: dict) -> list[str]:
    """The specification's reading of the numbers, in words."""
    notes = []
    base, tuned = loss["base"], loss["fine_tuned"]
    if tuned < base:
        notes.append(f"Eval loss fell from {base:.4f} (base) to {tuned:.4f} (fine-tuned): the adapter fits held-out "
                     "answers better than the base model.")
    else:
        notes.append(f"Eval loss did not fall ({base:.4f} base, {tuned:.4f} fine-tuned): the adapter fits held-out "
                     "answers no better than the base model; check learning rate, steps and data.")
    if "train" in rouge and "eval" in rouge:
        tr, ev = rouge["train"]["fine_tuned"], rouge["eval"]["fine_tuned"]
        if tr - ev >= OVERFIT_GAP:
            notes.append(f"Train ROUGE-L ({tr:.3f}) is well above eval ({ev:.3f}): possible overfitting. Consider "
                         "more lora_dropout, some weight_decay, or fewer epochs.")
        elif tr < LOW_ROUGE and ev < LOW_ROUGE:
            notes.append(f"Train and eval ROUGE-L are both low ({tr:.3f}, {ev:.3f}): underfitting or metric "
                         "mismatch. ROUGE is rough for QA; inspect the answers below.")
        else:
            notes.append(f"Train ROUGE-L ({tr:.3f}) is not well above eval ({ev:.3f}): no sign of overfitting.")
        if ev < rouge["eval"]["base"]:
            notes.append(f"Fine-tuned eval ROUGE-L ({ev:.3f}) is below the base model's ({rouge['eval']['base']:.3f}): "
                         "read the answers below (greedy decoding can make small models repeat themselves).")
        if min(rouge["train"]["rows"], rouge["eval"]["rows"]) < 10:
            notes.append("ROUGE-L rests on fewer than 10 rows per split here: a very rough signal (raise --samples).")
    return notes


# ---------------------------------------------------------------- the command

def evaluate_run(run_dir: str | Path, data: str | None = None, samples: int = 20, max_new_tokens: int | None = None,
                 max_eval_samples: int | None = None, show: int = 5, model: str | None = None) -> Path:
    """Evaluate RUN_DIR's adapter and its base model; write the report; return the report folder."""
    if samples < 0 or show < 0:
        raise MedloraError("--samples and --show must be >= 0")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise MedloraError("--max_new_tokens must be >= 1")
    cfg = open_run(run_dir)
    limit = cfg.max_eval_samples if max_eval_samples is None else max_eval_samples
    rows = select_rows(cfg, run_dir, data, samples, limit if limit and limit > 0 else None)
    gen = generation_kwargs("greedy", max_new_tokens=max_new_tokens)
    loaded = load_for_inference(str(run_dir), model, cfg.trust_remote_code)
    log(f"evaluating {loaded.description} and its base model on {rows.source}")

    losses = {}
    for name in MODELS:
        with adapter(loaded.model, name == "fine_tuned"):
            losses[name] = answer_losses(loaded.model, loaded.tokenizer, rows.loss, cfg, f"eval loss ({LABELS[name]})")
    loss = {m: float(np.mean(v)) for m, v in losses.items()}
    items = generate_answers(loaded, rows.rouge, gen) if samples else []
    rouge = rouge_summary(items)

    metrics = {
        "run_dir": str(run_dir),
        "base_model": model or cfg.model,
        "data": rows.source,
        "loss_rows": len(losses["base"]),
        "eval_loss": {m: round(v, 4) for m, v in loss.items()},
        "perplexity": {m: round(math.exp(min(v, 50)), 4) for m, v in loss.items()},
        "rouge_l_f1": rouge,
        "interpretation": interpret(loss, rouge),
        "rouge_caveat": ROUGE_CAVEAT,
        "generation": gen,
        "training": _training_summary(run_dir),
        "answers": items,
    }
    out = Path(run_dir) / ("eval" if data is None else f"eval-{Path(data).stem}")
    out.mkdir(exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    shown = [i for i in items if i["split"] != "train"][:show]
    curve = Path(run_dir) / "loss_curve.png"
    (out / "report.md").write_text(render_markdown(metrics, shown, curve.is_file()), encoding="utf-8")
    (out / "report.html").write_text(render_html(metrics, shown, curve), encoding="utf-8")
    log(f"eval loss {loss['base']:.4f} (base) -> {loss['fine_tuned']:.4f} (fine-tuned); report in {out}")
    return out


def _training_summary(run_dir) -> dict:
    p = Path(run_dir) / "metrics.json"
    m = json.loads(p.read_text()) if p.is_file() else {}
    keys = ("train_steps", "train_samples", "train_loss", "train_seconds", "base_eval_loss", "eval_loss")
    return {k: m[k] for k in keys if k in m}


# ---------------------------------------------------------------- reports

def metric_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """(label, base, fine-tuned) rows of the metrics table, shared by both reports."""
    n = metrics["loss_rows"]
    rows = [(f"eval loss (answer tokens, {n} rows; lower is better)",
             *(f"{metrics['eval_loss'][m]:.4f}" for m in MODELS)),
            ("perplexity", *(f"{metrics['perplexity'][m]:.2f}" for m in MODELS))]
    for split_name, r in metrics["rouge_l_f1"].items():
        rows.append((f"ROUGE-L F1, {split_name} ({r['rows']} rows; higher is better)",
                     *(f"{r[m]:.3f}" for m in MODELS)))
    return rows


def _subtitle(metrics: dict) -> str:
    gen = metrics["generation"]
    t = metrics["training"]
    trained = f"{t['train_steps']} training steps, " if "train_steps" in t else ""
    return (f"Run {metrics['run_dir']} ({trained}base model {metrics['base_model']}). Data: {metrics['data']}. "
            f"Answers: greedy, max_new_tokens {gen['max_new_tokens']}.")


def render_markdown(metrics: dict, shown: list[dict], has_curve: bool = True) -> str:
    lines = [f"# medlora eval: {Path(metrics['run_dir']).name}", "", _subtitle(metrics), "", "## Metrics", "",
             "| | base | fine-tuned |", "|---|---:|---:|"]
    lines += [f"| {label} | {b} | {f} |" for label, b, f in metric_rows(metrics)]
    lines += ["", *(f"- {note}" for note in metrics["interpretation"]), "", f"> {metrics['rouge_caveat']}", ""]
    if has_curve:
        lines += ["## Training loss", "", "![training loss curve](../loss_curve.png)", ""]
    if shown:
        lines += ["## Side-by-side answers", ""]
    for i, item in enumerate(shown, 1):
        lines += [f"### {i}. {' '.join(item['question'].split())}", ""]
        for label, key in (("Reference", "reference"), ("Base", "base"), ("Fine-tuned", "fine_tuned")):
            score = f" (ROUGE-L {item[f'rouge_l_{key}']:.3f})" if key != "reference" else ""
            quoted = "\n".join(f"> {line}" if line else ">" for line in item[key].splitlines()) or "> (empty)"
            lines += [f"**{label}**{score}", "", quoted, ""]
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.35em .7em;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}.caveat{background:#fff6d6;padding:.6em 1em;border-radius:4px}
.qa{width:100%;table-layout:fixed}.qa td{white-space:pre-wrap;font-size:.92em}.muted{color:#666}
img{max-width:100%}
"""


def _img_tag(png: Path) -> str:
    if not png.is_file():
        return '<p class="muted">(no loss_curve.png in the run folder)</p>'
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<img alt="training loss curve" src="data:image/png;base64,{data}">'


def render_html(metrics: dict, shown: list[dict], loss_curve: Path) -> str:
    e = html.escape
    table = "".join(f"<tr><td>{e(label)}</td><td class=n>{e(b)}</td><td class=n>{e(f)}</td></tr>"
                    for label, b, f in metric_rows(metrics))
    notes = "".join(f"<li>{e(n)}</li>" for n in metrics["interpretation"])
    answers = ""
    for i, item in enumerate(shown, 1):
        cells = "".join(f"<td>{e(item[k])}</td>" for k in ("reference", "base", "fine_tuned"))
        scores = "".join(f"<th>{e(LABELS[m])} (ROUGE-L {item[f'rouge_l_{m}']:.3f})</th>" for m in MODELS)
        answers += (f"<h3>{i}. {e(item['question'])}</h3><table class=qa><tr><th>reference</th>{scores}</tr>"
                    f"<tr>{cells}</tr></table>")
    title = e(f"medlora eval: {Path(metrics['run_dir']).name}")
    return (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>{title}</title><style>{CSS}</style></head><body>"
            f"<h1>{title}</h1><p class=muted>{e(_subtitle(metrics))}</p>"
            f"<h2>Metrics</h2><table><tr><th></th><th>base</th><th>fine-tuned</th></tr>{table}</table>"
            f"<ul>{notes}</ul><p class=caveat>{e(metrics['rouge_caveat'])}</p>"
            f"<h2>Training loss</h2>{_img_tag(loss_curve)}"
            + (f"<h2>Side-by-side answers</h2>{answers}" if shown else "")
            + "</body></html>\n")
