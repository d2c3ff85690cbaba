"""The eval report: report.md, report.html (one self-contained page) and metrics.json, from the numbers
that compare.py measured."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ..rundir import LOSS_CURVE, METRICS, REPORT_HTML, REPORT_MD

MODELS = ("base", "fine_tuned")
LABELS = {"base": "base", "fine_tuned": "fine-tuned"}
ROUGE_CAVEAT = ("ROUGE is not a medical correctness metric: use it only as a quick signal and always "
                "review the answers themselves.")

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


def sections(metrics: dict) -> list[tuple[str, list[tuple[str, str, str]], list[str]]]:
    """The forgetting and safety sections: (title, (label, base, fine-tuned) rows, notes), for both reports."""
    out = []
    forgetting = metrics.get("forgetting")
    if forgetting:
        loss = forgetting["loss"]
        out.append(("Forgetting: general (non-medical) instructions",
                    [(f"answer-token loss ({forgetting['rows']} team-written instructions; lower is better)",
                      f"{loss['base']:.4f}", f"{loss['fine_tuned']:.4f}")], [forgetting["note"]]))
    safety = metrics.get("safety")
    if safety:
        g, n = safety["guard"], safety["answered"]
        pct = "{:.0%}".format
        rows = [(f"red-flag answers that tell the person to get emergency help, model alone ({n} questions)",
                 pct(safety["model_alone"]["base"]), pct(safety["model_alone"]["fine_tuned"])),
                (f"the same with the emergency guard {'on' if safety['guard_enabled'] else 'off'}",
                 pct(safety["end_to_end"]["base"]), pct(safety["end_to_end"]["fine_tuned"]))]
        guard = [f"Guard recall on the {g['red_flag_questions']} bundled red-flag questions ({g['red_flag_categories']} "
                 f"categories): {g['recall']:.1%}; false alarms on {g['control_questions']} non-urgent controls: "
                 f"{g['false_alarm_rate_controls']:.1%}; on the {g['eval_split_questions']} eval questions: "
                 f"{g['false_alarm_rate_eval_split']:.1%}."]
        out.append(("Safety: red-flag questions", rows, safety["notes"] + guard + [SAFETY_CAVEAT]))
    return out


SAFETY_CAVEAT = ("Both the guard and the answer check are keyword rules, not a triage system: read the red-flag "
                 f"answers in {METRICS} before putting a model in front of people.")


def _subtitle(metrics: dict) -> str:
    gen = metrics["generation"]
    t = metrics["training"]
    trained = f"{t['train_steps']} training steps, " if "train_steps" in t else ""
    return (f"Run {metrics['run_dir']} ({trained}base model {metrics['base_model']}). Data: {metrics['data']}. "
            f"Answers: greedy, max_new_tokens {gen['max_new_tokens']}, {metrics.get('backend', 'hf')} backend, "
            f"emergency guard {'on' if metrics.get('safety_guard', {}).get('enabled', True) else 'off'}.")


def render_markdown(metrics: dict, shown: list[dict], has_curve: bool = True) -> str:
    lines = [f"# medlora eval: {Path(metrics['run_dir']).name}", "", _subtitle(metrics), "", "## Metrics", "",
             "| | base | fine-tuned |", "|---|---:|---:|"]
    lines += [f"| {label} | {b} | {f} |" for label, b, f in metric_rows(metrics)]
    lines += ["", *(f"- {note}" for note in metrics["interpretation"]), "", f"> {metrics['rouge_caveat']}", ""]
    for title, rows, notes in sections(metrics):
        lines += [f"## {title}", "", "| | base | fine-tuned |", "|---|---:|---:|",
                  *(f"| {label} | {b} | {f} |" for label, b, f in rows), "", *(f"- {n}" for n in notes), ""]
    if has_curve:
        lines += ["## Training loss", "", f"![training loss curve](../{LOSS_CURVE})", ""]
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
        return f'<p class="muted">(no {LOSS_CURVE} in the run folder)</p>'
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
    extra = ""
    for head, rows, items in sections(metrics):
        body = "".join(f"<tr><td>{e(label)}</td><td class=n>{e(b)}</td><td class=n>{e(f)}</td></tr>"
                       for label, b, f in rows)
        extra += (f"<h2>{e(head)}</h2><table><tr><th></th><th>base</th><th>fine-tuned</th></tr>{body}</table>"
                  f"<ul>{''.join(f'<li>{e(n)}</li>' for n in items)}</ul>")
    title = e(f"medlora eval: {Path(metrics['run_dir']).name}")
    return (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>{title}</title><style>{CSS}</style></head><body>"
            f"<h1>{title}</h1><p class=muted>{e(_subtitle(metrics))}</p>"
            f"<h2>Metrics</h2><table><tr><th></th><th>base</th><th>fine-tuned</th></tr>{table}</table>"
            f"<ul>{notes}</ul><p class=caveat>{e(metrics['rouge_caveat'])}</p>{extra}"
            f"<h2>Training loss</h2>{_img_tag(loss_curve)}"
            + (f"<h2>Side-by-side answers</h2>{answers}" if shown else "")
            + "</body></html>\n")


def write_report(out: Path, metrics: dict, shown: list[dict], loss_curve: Path) -> None:
    """metrics.json (every answer and score), report.md and report.html into ``out``."""
    out.mkdir(exist_ok=True)
    (out / METRICS).write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / REPORT_MD).write_text(render_markdown(metrics, shown, loss_curve.is_file()), encoding="utf-8")
    (out / REPORT_HTML).write_text(render_html(metrics, shown, loss_curve), encoding="utf-8")
