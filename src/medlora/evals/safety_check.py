"""`medlora eval --safety`: does the model tell a person in an emergency to get help, and does the guard?

Measured on the team-written sets in ``data/safety/`` (red-flag questions and non-urgent controls):

- **model alone** (guard off): the share of greedy answers to red-flag questions that tell the person to call
  for help or go to emergency care (``safety.advises_emergency_help``), for the base and the fine-tuned model;
- **guard**: its recall on all red-flag questions, its false-alarm rate on the controls and on the questions of
  the run's own eval split;
- **end to end** (guard on): the share of red-flag answers that carry the emergency notice or the model's own
  advice.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..data import chat_messages
from ..errors import MedloraError
from ..inference.backend import GenerationParams
from ..safety import advises_emergency_help, detect

DATA_DIR = Path(__file__).resolve().parents[3] / "data"  # the repository's data/ folder
SAFETY_DIR = DATA_DIR / "safety"
MODELS = ("base", "fine_tuned")


def read_questions(path: Path) -> pd.DataFrame:
    """A team-written category,question CSV."""
    if not path.is_file():
        raise MedloraError(f"{path}: the bundled safety set is missing (it ships in the medlora repository's data/)")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(df.columns[:2]) != ["category", "question"] or df.empty:
        raise MedloraError(f"{path}: expected the columns category,question and at least one row")
    return df


def pick_round_robin(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """The first ``n`` questions taking one per category in turn, so a small sample covers every category."""
    ranked = df.assign(_rank=df.groupby("category").cumcount(), _cat=pd.factorize(df["category"])[0])
    return ranked.sort_values(["_rank", "_cat"], kind="stable").head(n).drop(columns=["_rank", "_cat"])


def rate(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else 0.0


def guard_rates(red: pd.DataFrame, controls: pd.DataFrame, eval_questions: list[str]) -> dict:
    """The detector alone (no model): recall on red flags, false alarms on controls and on the run's questions."""
    misses = [q for q in red["question"] if not detect(q)]
    control_alarms = [q for q in controls["question"] if detect(q)]
    eval_alarms = [q for q in eval_questions if detect(q)]
    return {
        "red_flag_questions": len(red), "red_flag_categories": int(red["category"].nunique()),
        "recall": rate([bool(detect(q)) for q in red["question"]]), "missed": misses,
        "control_questions": len(controls), "false_alarm_rate_controls": rate([bool(detect(q)) for q in
                                                                              controls["question"]]),
        "false_alarms_controls": control_alarms,
        "eval_split_questions": len(eval_questions),
        "false_alarm_rate_eval_split": rate([bool(detect(q)) for q in eval_questions]),
        "false_alarms_eval_split": eval_alarms,
    }


def safety_check(backend, eval_questions: list[str], samples: int, params: GenerationParams,
                 guard_enabled: bool, progress) -> dict:
    """Answer ``samples`` red-flag questions with base and fine-tuned (guard off, the model alone), and judge
    each answer; ``backend`` is a GuardedBackend (its ``inner`` is the model without the guard)."""
    red = read_questions(SAFETY_DIR / "red_flags.csv")
    controls = read_questions(SAFETY_DIR / "controls.csv")
    guard = guard_rates(red, controls, eval_questions)
    chosen = pick_round_robin(red, samples)
    bar = progress(total=len(chosen) * len(MODELS), desc="safety answers", unit="answer")
    answers = []
    for category, question in zip(chosen["category"], chosen["question"]):
        item = {"category": category, "question": question, "guard_fires": bool(detect(question))}
        for name in MODELS:
            with backend.adapter(name == "fine_tuned"):
                item[name] = backend.inner.stream(chat_messages(backend.system_prompt, question), params).text()
            item[f"advises_help_{name}"] = advises_emergency_help(item[name])
            bar.update()
        answers.append(item)
    bar.close()
    alone = {m: rate([a[f"advises_help_{m}"] for a in answers]) for m in MODELS}
    end_to_end = {m: rate([a[f"advises_help_{m}"] or (guard_enabled and a["guard_fires"]) for a in answers])
                  for m in MODELS}
    return {"guard": guard, "guard_enabled": guard_enabled, "answered": len(answers), "model_alone": alone,
            "end_to_end": end_to_end, "notes": safety_notes(alone, end_to_end, guard, len(answers)),
            "answers": answers}


def safety_notes(alone: dict, end_to_end: dict, guard: dict, n: int) -> list[str]:
    notes = []
    if alone["fine_tuned"] < alone["base"]:
        notes.append(f"Fine-tuning LOWERED the share of red-flag answers that tell the person to get emergency help "
                     f"({alone['base']:.0%} base -> {alone['fine_tuned']:.0%} fine-tuned, model alone). Keep the "
                     "emergency guard on wherever these answers reach people.")
    else:
        notes.append(f"Model alone, {alone['fine_tuned']:.0%} of the fine-tuned model's red-flag answers tell the "
                     f"person to get emergency help (base {alone['base']:.0%}).")
    notes.append(f"The guard found {guard['recall']:.0%} of the {guard['red_flag_questions']} bundled red-flag "
                 f"questions and fired on {guard['false_alarm_rate_controls']:.1%} of the controls and "
                 f"{guard['false_alarm_rate_eval_split']:.1%} of this run's eval questions; with it on, "
                 f"{end_to_end['fine_tuned']:.0%} of the answers point to emergency help.")
    if n < 20:
        notes.append(f"The model-alone rates rest on {n} questions: a rough signal (raise --safety_samples).")
    return notes
