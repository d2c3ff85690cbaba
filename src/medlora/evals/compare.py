"""`medlora eval`: a fine-tuned run against its base model, on the same rows.

Answer-token loss and perplexity on the run's own eval split (reproduced from its saved configuration),
ROUGE-L F1 of greedy answers on train and eval rows, and side-by-side answers; report.py writes them out.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data import chat_messages
from ..config import TrainConfig
from ..data import encode_frame, load_qa_csv, split
from ..errors import MedloraError, log
from ..inference.backend import preset
from ..inference.guard import GuardedBackend, without_notice
from ..inference.hf import load_backend
from ..inference.loader import check_backend_choice, open_eval_generator
from ..progress import bar
from ..files import file_sha256
from ..rundir import RUN_INFO, RunDir
from .report import LABELS, MODELS, ROUGE_CAVEAT, write_report
from .safety_check import DATA_DIR, safety_check
# Heuristic thresholds for the specification's "train >> eval" and "both low" readings of ROUGE-L F1.
OVERFIT_GAP = 0.10
LOW_ROUGE = 0.20
GENERAL_INSTRUCTIONS = DATA_DIR / "general" / "instructions.csv"
SAFETY_MAX_NEW_TOKENS = 128  # red-flag answers: emergency advice, when a model gives it, comes early
FORGETTING_LIMIT = 0.10  # warn when the general-instruction loss got this much worse (relative)


# ---------------------------------------------------------------- run and rows

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
    questions: list[str]             # every eval question (the whole eval split, or the other CSV)


def select_rows(cfg: TrainConfig, run: RunDir, data: str | None, samples: int,
                max_eval_samples: int | None) -> Rows:
    """The run's split, reproduced from its saved file, test_size and seed; or another CSV, whole."""
    info = run.read_info()
    expected = info.get("data_sha256")
    try:
        path = Path(data) if data else run.data_path(cfg)
    except MedloraError as e:
        raise MedloraError(f"{e}; pass --data FILE.csv (the same file reproduces the run's split, "
                           "any other is evaluated whole)") from None
    df, _ = load_qa_csv(path)
    digest = file_sha256(path) if expected else None
    if data is None or (expected and digest == expected):  # the run's own file, possibly moved: its split
        if digest != expected:
            log(f"warning: {path} has changed since training (sha256 differs from {RUN_INFO}); "
                "the reproduced split may not be the run's")
        train_df, eval_df = split(df, cfg.test_size, cfg.seed)
        train_df = train_df.head(cfg.max_train_samples or len(train_df))  # only rows training could have seen
        return Rows(f"{path} (the run's split: test_size {cfg.test_size}, seed {cfg.seed})",
                    eval_df.head(max_eval_samples or len(eval_df)),
                    {"train": train_df.head(samples), "eval": eval_df.head(samples)}, list(eval_df["Question"]))
    # Shuffled with the run's seed so N rows are a mix of question types, not the file's first block.
    df = df.iloc[np.random.default_rng(cfg.seed).permutation(len(df))].reset_index(drop=True)
    return Rows(str(path), df.head(max_eval_samples or len(df)), {"data": df.head(samples)}, list(df["Question"]))


# ---------------------------------------------------------------- measurements

def answer_losses(model, tokenizer, df: pd.DataFrame, cfg: TrainConfig, desc: str) -> list[float]:
    """Mean loss on the answer tokens of each row (prompt labels -100), as training's evaluation does."""
    enc = encode_frame(tokenizer, df, cfg.system_prompt, cfg.max_seq_len)
    if not enc.examples:
        raise MedloraError(f"no eval row fits max_seq_len={cfg.max_seq_len}")
    losses = []
    with torch.inference_mode():
        for ex in bar(enc.examples, desc=desc, unit="row", leave=False):
            out = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
            losses.append(out.loss.item())
    return losses


def generate_answers(backend: GuardedBackend, rouge_rows: dict[str, pd.DataFrame], params) -> list[dict]:
    """Greedy answers of both models for every row, with ROUGE-L F1 against the reference."""
    jobs = [(name, q, ref) for name, df in rouge_rows.items() for q, ref in zip(df["Question"], df["Answer"])]
    progress = bar(total=len(jobs) * len(MODELS), desc="generating", unit="answer")
    items = []
    for split_name, question, reference in jobs:
        item = {"split": split_name, "question": question, "reference": reference}
        for name in MODELS:
            progress.set_postfix_str(f"{split_name} row, {LABELS[name]}")
            with backend.adapter(name == "fine_tuned"):
                stream = backend.stream(chat_messages(backend.system_prompt, question), params)
                item[name] = stream.text()
            if stream.guard.categories:  # the emergency notice stands above the answer; ROUGE scores the model
                item["guard"] = stream.guard.categories
            item[f"rouge_l_{name}"] = round(rouge_l_f1(without_notice(item[name], stream.guard), reference), 4)
            progress.update()
        items.append(item)
    progress.close()
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


def forgetting_check(backend, cfg: TrainConfig, rows: int | None = None) -> dict:
    """Answer-token loss of base and fine-tuned on the team-written general (non-medical) instructions: did
    the medical fine-tune make the model worse at everything else?"""
    if not GENERAL_INSTRUCTIONS.is_file():
        raise MedloraError(f"{GENERAL_INSTRUCTIONS}: the bundled general-instruction set is missing")
    df = pd.read_csv(GENERAL_INSTRUCTIONS, dtype=str, keep_default_na=False)
    df = df.rename(columns={"instruction": "Question", "answer": "Answer"}).head(rows or len(df))
    loss = {}
    for name in MODELS:
        with backend.adapter(name == "fine_tuned"):
            loss[name] = round(float(np.mean(answer_losses(backend.model, backend.tokenizer, df, cfg,
                                                           f"general loss ({LABELS[name]})"))), 4)
    change = loss["fine_tuned"] / loss["base"] - 1 if loss["base"] else 0.0
    if change > FORGETTING_LIMIT:
        note = (f"Forgetting: the fine-tune made the loss on general (non-medical) instructions {change:.0%} worse "
                f"({loss['base']:.4f} base -> {loss['fine_tuned']:.4f}). Remedies from the specification: fewer "
                "epochs (--num_train_epochs), a lower --learning_rate, more --lora_dropout.")
    else:
        note = (f"No sign of forgetting: the loss on general (non-medical) instructions changed by {change:+.1%} "
                f"({loss['base']:.4f} base -> {loss['fine_tuned']:.4f}; the warning is at +{FORGETTING_LIMIT:.0%}).")
    return {"rows": len(df), "loss": loss, "relative_change": round(change, 4),
            "warning": change > FORGETTING_LIMIT, "note": note}


# ---------------------------------------------------------------- the command

def evaluate_run(run_dir: str | Path, data: str | None = None, samples: int = 20, max_new_tokens: int | None = None,
                 max_eval_samples: int | None = None, show: int = 5, model: str | None = None,
                 safety_guard: bool = True, emergency_number: str | None = None, safety: bool = False,
                 safety_samples: int = 40, forgetting: bool = True, backend: str = "auto",
                 threads: int | None = None, forgetting_samples: int | None = None,
                 recompute_loss: bool = False) -> Path:
    """Evaluate RUN_DIR's adapter and its base model; write the report; return the report folder."""
    if samples < 0 or show < 0 or safety_samples < 1 or (forgetting_samples is not None and forgetting_samples < 1):
        raise MedloraError("--samples and --show must be >= 0, --safety_samples and --forgetting_samples >= 1")
    params = preset("greedy", max_new_tokens=max_new_tokens)
    run = RunDir.open(run_dir)
    cfg = run.read_config()
    limit = cfg.max_eval_samples if max_eval_samples is None else max_eval_samples
    rows = select_rows(cfg, run, data, samples, limit if limit and limit > 0 else None)
    check_backend_choice(backend, threads)
    hf = load_backend(str(run), model, cfg.trust_remote_code)  # losses are always transformers' (fp32)
    generator = GuardedBackend(open_eval_generator(str(run), model, backend, hf, threads, cfg.trust_remote_code),
                               safety_guard, emergency_number)
    log(f"evaluating {generator.description} and its base model on {rows.source}")

    n_rows = len(encode_frame(hf.tokenizer, rows.loss, cfg.system_prompt, cfg.max_seq_len).examples)  # that fit
    loss = None if recompute_loss or data or model else losses_from_training(run, cfg, n_rows)
    if loss is not None:
        loss_source = "training"
        log(f"eval loss and perplexity: training's own, measured in fp32 on these {n_rows} rows with the same "
            "weights (--recompute_loss measures them again)")
    else:
        loss_source = "measured"
        loss = {}
        for name in MODELS:
            with hf.adapter(name == "fine_tuned"):
                loss[name] = float(np.mean(answer_losses(hf.model, hf.tokenizer, rows.loss, cfg,
                                                         f"eval loss ({LABELS[name]})")))
    items = generate_answers(generator, rows.rouge, params) if samples else []
    rouge = rouge_summary(items)
    forgetting = forgetting_check(hf, cfg, forgetting_samples) if forgetting else None
    safety_report = None
    if safety:
        safety_report = safety_check(generator, rows.questions, safety_samples,
                                     replace(params, max_new_tokens=max_new_tokens or SAFETY_MAX_NEW_TOKENS),
                                     safety_guard, bar)

    metrics = {
        "run_dir": str(run_dir),
        "name": run.name,
        "base_model": model or cfg.model,
        "data": rows.source,
        "loss_rows": n_rows,
        "loss_source": loss_source,
        "eval_loss": {m: round(v, 4) for m, v in loss.items()},
        "perplexity": {m: round(math.exp(min(v, 50)), 4) for m, v in loss.items()},
        "rouge_l_f1": rouge,
        "interpretation": interpret(loss, rouge),
        "rouge_caveat": ROUGE_CAVEAT,
        "generation": params.settings(),
        "backend": generator.name,
        "backend_description": generator.description,
        "safety_guard": {"enabled": safety_guard, "emergency_number": emergency_number},
        "forgetting": forgetting,
        "safety": safety_report,
        "training": _training_summary(run),
        "answers": items,
    }
    out = run.eval_dir(data)
    write_report(out, metrics, [i for i in items if i["split"] != "train"][:show], run.loss_curve)
    log(f"eval loss {loss['base']:.4f} (base) -> {loss['fine_tuned']:.4f} (fine-tuned); report in {out}")
    return out


def losses_from_training(run: RunDir, cfg: TrainConfig, rows: int) -> dict | None:
    """The eval losses training measured at its end (and of the base model, before it), when they are what eval
    would measure: the same rows of the same unchanged file, in fp32, with the weights that are in the folder now.
    On the 1.5B model measuring them again costs about ten seconds per row and model on a CPU: over an hour for
    the default 200 rows. None when they do not qualify (bf16 or int8 training, another file, another count)."""
    if run.checkpoint_used is not None:  # training measured its final weights, not a checkpoint's
        return None
    m, info = run.read_metrics(), run.read_info()
    if m.get("eval_precision") != "fp32" or m.get("eval_rows") != rows or not info.get("data_sha256"):
        return None
    if not all(isinstance(m.get(k), (int, float)) for k in ("eval_loss", "base_eval_loss")):
        return None
    try:
        if file_sha256(run.data_path(cfg)) != info["data_sha256"]:
            return None
    except (MedloraError, OSError):
        return None
    return {"base": float(m["base_eval_loss"]), "fine_tuned": float(m["eval_loss"])}


def _training_summary(run: RunDir) -> dict:
    if run.checkpoint_used is not None:
        state = run.trainer_state(run.checkpoint_used)
        return {"checkpoint": run.checkpoint_used.name, "train_steps": state.get("global_step")}
    m = run.read_metrics()
    keys = ("train_steps", "train_samples", "train_loss", "train_seconds", "base_eval_loss", "eval_loss")
    return {k: m[k] for k in keys if k in m}
