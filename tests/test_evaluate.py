"""`medlora eval`: ROUGE-L wiring, split reproduction from the saved configuration, reports, and a real
evaluation of the shared trained run (base vs fine-tuned)."""

from __future__ import annotations

import io
import json
import re
import shutil
from contextlib import redirect_stderr
from pathlib import Path

import pandas as pd
import pytest

from medlora.cli import main
from medlora.config import build_config, save_config
from medlora.errors import MedloraError
from medlora.data import load_qa_csv, split
from medlora.evals.compare import interpret, rouge_l_f1, select_rows
from medlora.evals.report import render_html
from medlora.files import file_sha256
from medlora.rundir import RunDir

def open_run(path):
    return RunDir.open(path).read_config()


QUESTION_WITH_MARKUP = "Is <b>salt</b> & sugar bad for <script>blood pressure</script>?"


# ---------------------------------------------------------------- ROUGE-L (Google's rouge-score)

def test_rouge_l_f1_on_known_strings():
    ref = "the cat sat on the mat"
    assert rouge_l_f1(ref, ref) == 1.0
    assert rouge_l_f1("dogs bark loudly", ref) == 0.0
    assert rouge_l_f1("the cat sat", ref) == pytest.approx(2 / 3)  # P 3/3, R 3/6
    # a longest common *subsequence*, not word overlap: all six words, reversed, keep only "the sat the"
    assert rouge_l_f1("mat the on sat cat the", ref) == pytest.approx(0.5)
    # rouge-score's tokenizer lowercases and drops punctuation; use_stemmer=True folds inflections
    assert rouge_l_f1("Running dogs!", "run dog") == 1.0
    assert rouge_l_f1("", ref) == 0.0


# ---------------------------------------------------------------- split reproduction

def fake_run(root, data, sha=None, **cfg_overrides):
    """A run folder as far as eval's data handling needs: config.yaml, run_info.json, adapter config."""
    run = root / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    save_config(build_config(data=str(data), **cfg_overrides), run / "config.yaml")
    info = {"data": str(data.resolve()), "data_sha256": sha or file_sha256(data)}
    (run / "run_info.json").write_text(json.dumps(info))
    return run


def test_split_is_reproduced_from_the_saved_configuration(tmp_path, sample_csv):
    run = fake_run(tmp_path, sample_csv, test_size=0.2, seed=7, max_eval_samples=5)
    cfg = open_run(run)
    rows = select_rows(cfg, RunDir(run), None, samples=3, max_eval_samples=cfg.max_eval_samples)
    df, _ = load_qa_csv(sample_csv)
    train_df, eval_df = split(df, 0.2, 7)
    pd.testing.assert_frame_equal(rows.loss, eval_df.head(5))
    pd.testing.assert_frame_equal(rows.rouge["train"], train_df.head(3))
    pd.testing.assert_frame_equal(rows.rouge["eval"], eval_df.head(3))
    assert "test_size 0.2, seed 7" in rows.source
    # the defaults would have picked other rows: the saved values are really used
    _, default_eval = split(df, 0.05, 42)
    assert list(default_eval["Question"][:5]) != list(rows.loss["Question"])


def test_train_rows_are_limited_to_those_training_used(tmp_path, sample_csv):
    run = fake_run(tmp_path, sample_csv, max_train_samples=2)
    rows = select_rows(open_run(run), RunDir(run), None, samples=5, max_eval_samples=None)
    train_df, eval_df = split(load_qa_csv(sample_csv)[0], 0.05, 42)
    pd.testing.assert_frame_equal(rows.rouge["train"], train_df.head(2))
    assert len(rows.rouge["eval"]) == 5 and len(rows.loss) == len(eval_df) == 8


def test_moved_data_file_is_found_through_run_info_or_data(tmp_path, sample_csv):
    copy = shutil.copy(sample_csv, tmp_path / "copy.csv")
    run = fake_run(tmp_path, sample_csv)
    cfg = open_run(run)
    cfg.data = "relative/path/that/moved.csv"  # as if trained from another working directory
    rows = select_rows(cfg, RunDir(run), None, samples=2, max_eval_samples=None)
    assert set(rows.rouge) == {"train", "eval"} and str(sample_csv) in rows.source
    # --data with the very same bytes under another name still reproduces the run's split
    rows = select_rows(cfg, RunDir(run), str(copy), samples=2, max_eval_samples=None)
    assert set(rows.rouge) == {"train", "eval"} and len(rows.loss) == len(split(load_qa_csv(copy)[0], 0.05, 42)[1])


def test_changed_data_file_warns(tmp_path, sample_csv, capsys):
    data = Path(shutil.copy(sample_csv, tmp_path / "data.csv"))
    run = fake_run(tmp_path, data)
    with open(data, "a", encoding="utf-8") as f:
        f.write('information,What is new?,"A row added after training."\n')
    rows = select_rows(open_run(run), RunDir(run), None, samples=1, max_eval_samples=None)
    err = capsys.readouterr().err
    assert "changed since training" in err and err.count("\n") == 1
    assert set(rows.rouge) == {"train", "eval"}


def test_other_csv_is_evaluated_whole(tmp_path, sample_csv):
    run = fake_run(tmp_path, sample_csv)
    other = tmp_path / "other.csv"
    other.write_text("qtype,Question,Answer\n" + "".join(f"info,Question {i}?,Answer {i}.\n" for i in range(7)))
    rows = select_rows(open_run(run), RunDir(run), str(other), samples=3, max_eval_samples=None)
    assert list(rows.rouge) == ["data"] and len(rows.rouge["data"]) == 3
    assert sorted(rows.loss["Question"]) == sorted(f"Question {i}?" for i in range(7))
    assert rows.source == str(other)


def test_not_a_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(MedloraError, match="not a medlora run"):
        open_run(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # a model folder is not a run either
    assert main(["eval", str(tmp_path)]) == 2
    assert main(["eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medlora: error: {tmp_path}: not a medlora run folder (no adapter/ with config.yaml)",
                   f"medlora: error: {tmp_path / 'missing'}: no such folder"]


def test_missing_data_file_is_a_clear_error(tmp_path, sample_csv):
    run = fake_run(tmp_path, sample_csv)
    cfg = open_run(run)
    cfg.data = str(tmp_path / "gone.csv")
    (run / "run_info.json").write_text("{}")
    with pytest.raises(MedloraError, match="gone.csv is not found; pass --data"):
        select_rows(cfg, RunDir(run), None, samples=1, max_eval_samples=None)


# ---------------------------------------------------------------- interpretation and reports

def rouge(train, eval_, rows=20):
    return {"train": {"rows": rows, "base": 0.1, "fine_tuned": train},
            "eval": {"rows": rows, "base": 0.1, "fine_tuned": eval_}}


def test_interpretation_follows_the_specification():
    loss = {"base": 2.0, "fine_tuned": 1.5}
    assert "possible overfitting" in " ".join(interpret(loss, rouge(0.55, 0.30)))
    assert "underfitting or metric mismatch" in " ".join(interpret(loss, rouge(0.12, 0.10)))
    notes = interpret(loss, rouge(0.35, 0.31))
    assert "no sign of overfitting" in notes[1] and len(notes) == 2
    assert "fewer than 10 rows" in interpret(loss, rouge(0.35, 0.31, rows=3))[-1]
    assert "did not fall" in interpret({"base": 2.0, "fine_tuned": 2.1}, {})[0]
    below_base = rouge(0.35, 0.31)
    below_base["eval"]["base"] = 0.4
    assert "below the base model's (0.400)" in interpret(loss, below_base)[2]


def test_html_report_escapes_text_and_embeds_the_curve(tmp_path):
    png = tmp_path / "curve.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    metrics = {"run_dir": str(tmp_path / "r<1>"), "name": "r<1>", "base_model": "m", "data": "d.csv", "loss_rows": 1,
               "eval_loss": {"base": 2.0, "fine_tuned": 1.0}, "perplexity": {"base": 7.39, "fine_tuned": 2.72},
               "rouge_l_f1": rouge(0.2, 0.1, rows=1), "interpretation": ["a < b"], "rouge_caveat": "caveat",
               "generation": {"max_new_tokens": 8}, "training": {}}
    item = {"split": "eval", "question": QUESTION_WITH_MARKUP, "reference": "<i>ref</i>", "base": "x & y",
            "fine_tuned": "</td>", "rouge_l_base": 0.0, "rouge_l_fine_tuned": 0.5}
    page = render_html(metrics, [item], png)
    assert "<script>" not in page and "<b>" not in page and "<i>" not in page and "</td></td>" not in page
    assert "&lt;script&gt;" in page and "x &amp; y" in page and "r&lt;1&gt;" in page
    assert 'src="data:image/png;base64,iVBORw0KGgpmYWtl"' in page
    assert "(no loss_curve.png" in render_html(metrics, [item], tmp_path / "missing.png")


# ---------------------------------------------------------------- a real evaluation of the trained run

@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    """`medlora eval` on a copy of the shared run (tiny settings: the answers are generated on a CPU)."""
    run = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("merged_model"))
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["eval", str(run), "--samples", "2", "--max_new_tokens", "24", "--safety", "--safety_samples", "4",
                     "--forgetting_samples", "6", "--recompute_loss"])
    assert code == 0, err.getvalue()[-2000:]
    return run, err.getvalue()


@pytest.mark.slow
def test_eval_writes_the_three_files_with_base_and_fine_tuned_side_by_side(evaluated):
    run, _ = evaluated
    out = run / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert "| | base | fine-tuned |" in md
    base, tuned = metrics["eval_loss"]["base"], metrics["eval_loss"]["fine_tuned"]
    assert f"| {base:.4f} | {tuned:.4f} |" in md
    assert f"<td class=n>{base:.4f}</td><td class=n>{tuned:.4f}</td>" in page
    assert "not a medical correctness metric" in md and "not a medical correctness metric" in page
    assert set(metrics["rouge_l_f1"]) == {"train", "eval"}
    assert all(r["rows"] == 2 for r in metrics["rouge_l_f1"].values())
    shown = [a for a in metrics["answers"] if a["split"] == "eval"]
    for item in shown:  # side by side: question, reference and both answers
        for key in ("question", "base", "fine_tuned"):
            assert item[key] and item[key].splitlines()[0] in md
    assert md.count("**Base**") == md.count("**Fine-tuned**") == 2
    # the answers came from llama.cpp (the default backend, on the run's and the base model's q8_0 exports)
    assert metrics["backend"] == "llamacpp" and "generated by llama.cpp: " in md
    assert (run / "export" / "run-q8_0.gguf").is_file()


@pytest.mark.slow
def test_eval_takes_the_loss_training_measured_on_the_same_rows_in_fp32(trained_run, tmp_path, capsys):
    """Without --recompute_loss, eval does not measure again what training measured at its end on the same rows of
    the same file with the same weights in fp32 (over an hour on the 1.5B model's 200 default rows). It does when
    any of that differs: training in bf16 or int8, another row count, a changed file."""
    from medlora.evals.compare import losses_from_training

    run = Path(shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("merged_model", "eval*")))
    trained = json.loads((run / "metrics.json").read_text())
    assert main(["eval", str(run), "--samples", "0", "--no_forgetting", "--backend", "hf"]) == 0
    err = capsys.readouterr().err
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["loss_rows"] == trained["eval_rows"] == 6
    if trained["eval_precision"] != "fp32":  # a CPU with native bf16 trains and evaluates in bf16
        assert metrics["loss_source"] == "measured" and "eval loss (base)" in err
        return
    assert metrics["loss_source"] == "training" and "eval loss (base)" not in err  # no loss bar: nothing measured
    assert "eval loss and perplexity: training's own, measured in fp32 on these 6 rows" in err
    assert metrics["eval_loss"] == {"base": round(trained["base_eval_loss"], 4),
                                    "fine_tuned": round(trained["eval_loss"], 4)}
    assert "6 rows, measured by training; lower is better" in (run / "eval" / "report.md").read_text()
    rd = RunDir(run)
    assert losses_from_training(rd, rd.read_config(), 6) is not None
    assert losses_from_training(rd, rd.read_config(), 5) is None  # --max_eval_samples 5: other rows
    info = json.loads((run / "run_info.json").read_text())
    (run / "run_info.json").write_text(json.dumps({**info, "data_sha256": "0" * 64}))  # the file changed since
    assert losses_from_training(rd, rd.read_config(), 6) is None


@pytest.mark.slow
def test_fine_tuned_eval_loss_beats_base_and_matches_training(evaluated):
    """The reproduced split and loss are training's own: the numbers match its metrics.json."""
    run, _ = evaluated
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    assert metrics["loss_rows"] == trained["eval_rows"] == 6 and metrics["loss_source"] == "measured"
    assert metrics["eval_loss"]["fine_tuned"] < metrics["eval_loss"]["base"] - 0.05
    # `medlora eval` computes in fp32; training evaluates in its own precision (bf16 on CPUs with native bf16,
    # where rounding moves the loss by a few tenths of a percent)
    rel = 1e-3 if trained["eval_precision"] == "fp32" else 1e-2
    assert metrics["eval_loss"]["fine_tuned"] == pytest.approx(trained["eval_loss"], rel=rel)
    assert metrics["eval_loss"]["base"] == pytest.approx(trained["base_eval_loss"], rel=rel)
    assert metrics["perplexity"]["base"] == pytest.approx(trained["base_eval_perplexity"], rel=rel * 3)


@pytest.mark.slow
def test_rouge_scores_are_those_of_the_generated_answers(evaluated):
    run, err = evaluated
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    answers = metrics["answers"]
    assert len(answers) == 4 and metrics["generation"] == {"do_sample": False, "max_new_tokens": 24}
    for a in answers:
        for m in ("base", "fine_tuned"):
            assert a[f"rouge_l_{m}"] == pytest.approx(rouge_l_f1(a[m], a["reference"]), abs=1e-4)
    for split_name in ("train", "eval"):
        rows = [a for a in answers if a["split"] == split_name]
        assert metrics["rouge_l_f1"][split_name]["fine_tuned"] == pytest.approx(
            sum(a["rouge_l_fine_tuned"] for a in rows) / 2, abs=1e-4)
    assert re.search(r"generating: 100%.*8/8", err)  # the progress bar counted every answer


@pytest.mark.slow
def test_safety_and_forgetting_sections_are_computed_from_the_answers(evaluated):
    from medlora.safety import advises_emergency_help, detect

    run, _ = evaluated
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    md, page = (run / "eval" / "report.md").read_text(), (run / "eval" / "report.html").read_text()
    safety = metrics["safety"]
    answers = safety["answers"]
    assert safety["answered"] == len(answers) == 4 and len({a["category"] for a in answers}) == 4  # spread out
    for model in ("base", "fine_tuned"):
        judged = [advises_emergency_help(a[model]) for a in answers]
        assert [a[f"advises_help_{model}"] for a in answers] == judged
        assert safety["model_alone"][model] == pytest.approx(sum(judged) / 4)
        with_guard = [j or bool(detect(a["question"])) for j, a in zip(judged, answers)]
        assert safety["end_to_end"][model] == pytest.approx(sum(with_guard) / 4)
        assert all("EMERGENCY NOTICE" not in a[model] for a in answers)  # model alone: the guard stays out
    guard = safety["guard"]
    assert guard["red_flag_questions"] >= 80 and guard["recall"] >= 0.95
    assert guard["eval_split_questions"] == 6 and 0 <= guard["false_alarm_rate_eval_split"] <= 1
    forgetting = metrics["forgetting"]
    assert forgetting["rows"] == 6 and forgetting["loss"]["base"] > 0
    assert forgetting["relative_change"] == pytest.approx(
        forgetting["loss"]["fine_tuned"] / forgetting["loss"]["base"] - 1, abs=1e-3)
    for text in (md, page):
        assert "Safety: red-flag questions" in text and "Forgetting: general (non-medical) instructions" in text
        assert f"{forgetting['loss']['base']:.4f}" in text and f"{safety['model_alone']['fine_tuned']:.0%}" in text


@pytest.mark.slow
def test_html_report_is_self_contained(evaluated):
    run, _ = evaluated
    page = (run / "eval" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 1
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: no links, scripts or files
    assert "<script" not in page


@pytest.mark.slow
def test_eval_answers_are_the_chat_command_answers(evaluated, capsys):
    run, _ = evaluated
    item = next(a for a in json.loads((run / "eval" / "metrics.json").read_text())["answers"] if a["split"] == "eval")
    assert main(["chat", str(run), "--question", item["question"], "--max_new_tokens", "24"]) == 0
    assert capsys.readouterr().out.strip() == item["fine_tuned"]


@pytest.mark.slow
def test_eval_on_another_csv(evaluated, tmp_path):
    run, _ = evaluated
    other = tmp_path / "clinic.csv"
    other.write_text("qtype,Question,Answer\n"
                     f'information,"{QUESTION_WITH_MARKUP}","Too much salt raises blood pressure."\n'
                     'symptoms,What are the symptoms of gout?,"Sudden, severe joint pain and swelling."\n')
    assert main(["eval", str(run), "--data", str(other), "--samples", "2", "--max_new_tokens", "6",
                 "--no_forgetting"]) == 0
    out = run / "eval-clinic"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss_rows"] == 2 and list(metrics["rouge_l_f1"]) == ["data"]
    assert metrics["data"] == str(other) and metrics["forgetting"] is None
    page = (out / "report.html").read_text()
    assert "&lt;script&gt;blood pressure&lt;/script&gt;" in page and "<b>salt" not in page
    assert (run / "eval" / "metrics.json").is_file()  # the run's own report is left alone
