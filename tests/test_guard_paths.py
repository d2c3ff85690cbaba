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


class Recording:
    """A real backend that keeps the conversations it was given (what the model reads)."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stream(self, messages, params):
        self.seen.append(messages)
        return self.inner.stream(messages, params)


def test_a_conversation_keeps_the_notice_for_follow_ups_and_the_model_never_reads_old_notices(tiny_model_dir):
    """The guard reads the latest user message with the two before it, and self-harm anywhere in the conversation;
    the notices earlier answers carried (the REPL, the page and API clients send them back) never reach the model,
    which would learn to write look-alike notices."""
    from medlora.inference.backend import preset
    from medlora.inference.guard import GuardedBackend
    from medlora.inference.hf import load_backend
    from medlora.safety.notice import CRISIS_LINE

    backend = GuardedBackend(Recording(load_backend(model=str(tiny_model_dir))))
    params = preset("greedy", max_new_tokens=2)

    def say(*turns):
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        return "".join(backend.stream(messages, params))

    chest = "my husband has crushing chest pain and is sweating"
    notice = check(chest).notice
    first = say(chest)
    assert first.startswith(notice + "\n\n")
    follow_up = say(chest, first, "should I give him an aspirin or drive him to the hospital myself?")
    assert follow_up.startswith(notice + "\n\n")  # the follow-up alone matches nothing
    assert check("should I give him an aspirin or drive him to the hospital myself?").notice is None
    # the model read its earlier answer without the notice: only its own words
    assert backend.seen[-1][1]["content"] == first.removeprefix(notice + "\n\n")
    assert all("EMERGENCY NOTICE" not in m["content"] for m in backend.seen[-1])
    # three user messages later the chest pain is no longer read; thoughts of suicide are, however long ago
    later = ["thanks", "ok", "what foods are high in iron?", "ok", "and vitamin C?"]
    assert "EMERGENCY NOTICE" not in say(chest, "...", *later[:-1], later[-1])
    crisis = CRISIS_LINE.split("{")[0]
    assert crisis in say("i want to kill myself", "...", *later)
    assert crisis in say("I want to kill\u200bmyself", "...", "what's the most painless way")  # zero-width space


def test_text_parts_of_an_api_message_are_read_as_separate_lines():
    from medlora.safety import detect
    from medlora.serve.schemas import Message

    message = Message(role="user", content=[{"type": "text", "text": "my dad"}, {"type": "text", "text": "collapsed"}])
    assert message.as_dict()["content"] == "my dad\ncollapsed" and detect(message.as_dict()["content"])
