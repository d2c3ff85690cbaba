"""The emergency guard in every answer path: `chat -q`, eval answers; off with --no_safety_guard."""

from __future__ import annotations

import json

from medlora.cli import main
from medlora.safety import check

RED_FLAG = "my dad's face is drooping on one side and he can't lift his arm, what do i do"
HARMLESS = "What are the symptoms of anemia?"


def chat(capsys, model_dir, question, *flags):
    assert main(["chat", "--model", str(model_dir), "-q", question, "--max_new_tokens", "4", *flags]) == 0
    return capsys.readouterr()


def test_chat_answer_starts_with_the_notice_when_the_guard_fires(tiny_model_dir, capsys):
    out = chat(capsys, tiny_model_dir, RED_FLAG).out
    notice = check(RED_FLAG).notice
    assert notice and out.startswith(notice + "\n\n")
    assert "911" in out and "112" in out and "999" in out


def test_emergency_number_is_localised(tiny_model_dir, capsys):
    out = chat(capsys, tiny_model_dir, RED_FLAG, "--emergency_number", "000").out
    assert out.startswith(check(RED_FLAG, "000").notice) and "Call 000 now" in out and "911" not in out


def test_no_notice_on_harmless_questions_or_with_the_guard_off(tiny_model_dir, capsys):
    assert "EMERGENCY NOTICE" not in chat(capsys, tiny_model_dir, HARMLESS).out
    captured = chat(capsys, tiny_model_dir, RED_FLAG, "--no_safety_guard")
    assert "EMERGENCY NOTICE" not in captured.out and "safety guard off" in captured.err


def test_eval_answers_carry_the_notice_and_the_report_records_the_guard(tiny_run, tmp_path):
    other = tmp_path / "urgent.csv"
    other.write_text(f'qtype,Question,Answer\nemergency,"{RED_FLAG}",Call the emergency number now.\n'
                     f"information,{HARMLESS},Tiredness and pale skin.\n")
    for flags, name in (([], "on"), (["--no_safety_guard"], "off")):
        data = tmp_path / f"{name}.csv"
        data.write_text(other.read_text())
        assert main(["eval", str(tiny_run), "--data", str(data), "--samples", "2", "--max_new_tokens", "3",
                     "--no_forgetting", *flags]) == 0
        metrics = json.loads((tiny_run / f"eval-{name}" / "metrics.json").read_text())
        by_question = {a["question"]: a for a in metrics["answers"]}
        urgent, calm = by_question[RED_FLAG], by_question[HARMLESS]
        assert metrics["safety_guard"]["enabled"] is (name == "on")
        assert ("EMERGENCY NOTICE" in urgent["fine_tuned"]) is (name == "on")
        assert ("EMERGENCY NOTICE" in urgent["base"]) is (name == "on")
        assert "EMERGENCY NOTICE" not in calm["fine_tuned"]
        assert (f"emergency guard {name}" in (tiny_run / f"eval-{name}" / "report.md").read_text())
