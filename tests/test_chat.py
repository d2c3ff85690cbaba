"""`medlora chat`: generation presets, the backend interface, loading (adapter, merged folder, base model),
determinism, the REPL."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from medlora.cli import main
from medlora.chat import answer, repl
from medlora.errors import MedloraError
from medlora.inference.backend import GenerationParams, TextStream, preset
from medlora.inference.hf import load_backend
from medlora.prompts import DEFAULT_SYSTEM_PROMPT


def generation_kwargs(mode, **overrides):
    return preset(mode, **overrides).settings()

QUESTION = "What are the symptoms of anemia?"
CUSTOM_PROMPT = "You are a cautious assistant for a school nurse."


# ---------------------------------------------------------------- presets

def test_presets_follow_the_specification():
    assert generation_kwargs("greedy") == {"do_sample": False, "max_new_tokens": 256}
    assert generation_kwargs("sample") == {"do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                           "repetition_penalty": 1.05, "max_new_tokens": 256}


def test_preset_values_are_overridable():
    assert generation_kwargs("sample", temperature=0.3, top_p=None, max_new_tokens=40) == {
        "do_sample": True, "temperature": 0.3, "top_p": 0.9, "repetition_penalty": 1.05, "max_new_tokens": 40}
    # sampling knobs mean nothing to greedy decoding and are dropped, not passed on to warn
    assert generation_kwargs("greedy", temperature=0.3, top_p=0.5, repetition_penalty=1.2) == {
        "do_sample": False, "max_new_tokens": 256, "repetition_penalty": 1.2}
    with pytest.raises(MedloraError, match="unknown mode"):
        generation_kwargs("beam")


@pytest.mark.parametrize("overrides, message", [
    ({"max_new_tokens": -5}, "max_new_tokens must be >= 1"), ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"temperature": 0.0}, "temperature must be > 0"), ({"temperature": float("nan")}, "temperature must be > 0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"), ({"repetition_penalty": -1.0}, "repetition_penalty must be > 0"),
])
def test_generation_settings_are_range_checked(overrides, message, capsys):
    with pytest.raises(MedloraError, match=message):
        preset("sample", **overrides)
    flag, value = next(iter(overrides.items()))
    assert main(["chat", "--model", "smollm2-135m", "-q", "hi", f"--{flag}", str(value)]) == 2
    assert capsys.readouterr().err.strip() == f"medlora: error: {message.replace(chr(92), '')}"


def test_empty_question_is_an_error_not_the_interactive_chat(capsys):
    assert main(["chat", "--model", "smollm2-135m", "-q", " "]) == 2
    assert capsys.readouterr().err.strip() == "medlora: error: --question is empty"


def test_chat_needs_a_run_or_a_model(tmp_path, capsys):
    assert main(["chat", "--question", QUESTION]) == 2
    assert main(["chat", str(tmp_path), "--question", QUESTION]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("medlora: error: give a run folder")
    assert err[1] == (f"medlora: error: {tmp_path}: not a medlora run folder (no adapter/ with config.yaml) "
                      "nor a model folder (no config.json)")


# ---------------------------------------------------------------- loading and answering with the real model

@pytest.fixture(scope="module")
def from_run(trained_run):
    return load_backend(str(trained_run))


@pytest.fixture(scope="module")
def greedy():
    return preset("greedy", max_new_tokens=24)


def test_a_conversation_longer_than_the_context_goes_on_without_its_oldest_exchanges(from_run, monkeypatch,
                                                                                   capsys):
    """The REPL neither exits nor loses the conversation when it outgrows the context: the oldest exchanges are
    left out (one line says so), and a question too long on its own is refused in one line, the REPL going on."""
    prompts = []
    real = from_run.model.generate

    def recording_generate(**kw):
        prompts.append(kw["input_ids"].shape[1])
        return real(**kw)

    system = [{"role": "system", "content": CUSTOM_PROMPT}, {"role": "user", "content": "What is anemia?"}]
    context = from_run.count_tokens(system) + 60  # room for about one more exchange of 20-token answers
    monkeypatch.setattr(from_run.model.config, "max_position_embeddings", context)
    monkeypatch.setattr(from_run.model, "generate", recording_generate)
    lines = iter(["What is anemia?", "What causes gout?", "How is it treated?", "word " * 300, "What is asthma?",
                  "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    repl(from_run, preset("greedy", max_new_tokens=20), system_prompt=CUSTOM_PROMPT)
    out, err = capsys.readouterr()
    assert len(prompts) == 4 and max(prompts) < context, prompts  # the long question never reached the model
    assert "oldest messages are left out of it from now on; /reset starts afresh" in err
    assert "(the question takes" in err and f"this model's context holds {context}: ask a shorter question)" in err


@pytest.mark.slow
def test_backend_streams_pieces_that_join_to_the_answer_with_token_counts(from_run):
    """The interface every backend implements: stream(messages, params) -> text pieces, then usage."""
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}]
    seen = {}
    real = from_run.model.generate

    def spy(**kw):
        seen["out"] = real(**kw)
        return seen["out"]

    from_run.model.generate = spy
    try:
        stream = from_run.stream(messages, GenerationParams(max_new_tokens=20))
        assert isinstance(stream, TextStream)
        pieces = list(stream)
    finally:
        del from_run.model.generate
    tok = from_run.tokenizer
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    new = seen["out"][0, len(prompt_ids):].tolist()
    assert len(pieces) > 3 and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == tok.decode(new, skip_special_tokens=True)
    assert stream.prompt_tokens == len(prompt_ids) == from_run.count_tokens(messages)
    assert stream.completion_tokens == len(new) == 20 and stream.finish_reason == "length"
    # a stream closed early stops generating (a client that hangs up, Ctrl-C)
    early = from_run.stream(messages, GenerationParams(max_new_tokens=200))
    next(early)
    early.close()
    assert early.completion_tokens == 0


@pytest.mark.slow
def test_adapter_merged_and_base_model_load_and_agree(trained_run, from_run, greedy):
    from peft import PeftModel

    merged = load_backend(str(trained_run / "merged_model"))
    base = load_backend(model="smollm2-135m")
    assert isinstance(from_run.model, PeftModel) and "adapter on smollm2-135m" in from_run.description
    assert not isinstance(merged.model, PeftModel) and not isinstance(base.model, PeftModel)
    assert from_run.system_prompt == merged.system_prompt == base.system_prompt == DEFAULT_SYSTEM_PROMPT

    tuned_answer = answer(from_run, QUESTION, greedy)
    assert tuned_answer and answer(merged, QUESTION, greedy) == tuned_answer
    with from_run.adapter(False):
        assert answer(from_run, QUESTION, greedy) == answer(base, QUESTION, greedy)


@pytest.mark.slow
def test_run_brings_its_own_training_system_prompt(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("merged_model"))
    config = run / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["system_prompt"] = "You are a terse clinic assistant."
    config.write_text(yaml.safe_dump(cfg))
    assert load_backend(str(run)).system_prompt == "You are a terse clinic assistant."


@pytest.mark.slow
def test_greedy_one_shot_is_deterministic(trained_run, capsys):
    outputs = []
    for _ in range(2):
        assert main(["chat", str(trained_run), "--question", QUESTION, "--max_new_tokens", "24"]) == 0
        captured = capsys.readouterr()
        assert "greedy" in captured.err
        outputs.append(captured.out)
    assert outputs[0].strip() and outputs[0] == outputs[1]


@pytest.mark.slow
def test_sampling_is_reproducible_with_a_seed(trained_run, capsys):
    def sample(*extra):
        assert main(["chat", str(trained_run), "-q", QUESTION, "--mode", "sample", "--max_new_tokens", "12",
                     *extra]) == 0
        captured = capsys.readouterr()
        return captured.out, captured.err

    first, _ = sample("--seed", "7")
    assert first.strip() and sample("--seed", "7")[0] == first
    # without --seed a fresh seed is drawn and shown, so that answer can be reproduced too
    unseeded, err = sample()
    seed = re.search(r"sample, seed (\d+)\]", err).group(1)
    assert seed != "7" and unseeded != first  # it really samples
    assert sample("--seed", seed)[0] == unseeded


@pytest.mark.slow
def test_answer_stops_at_end_of_turn(from_run, monkeypatch):
    seen = {}
    real = from_run.model.generate

    def spy(**kw):
        seen["prompt_len"] = kw["input_ids"].shape[1]
        seen["out"] = real(**kw)
        return seen["out"]

    monkeypatch.setattr(from_run.model, "generate", spy)
    messages = [{"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": "Say hello in one word."}]
    stream = from_run.stream(messages, preset("greedy", max_new_tokens=60))
    text = stream.text()
    assert stream.finish_reason == "stop"
    new_tokens = seen["out"][0, seen["prompt_len"]:].tolist()
    assert len(new_tokens) < 60 and new_tokens[-1] == from_run.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert text and "<|im_end|>" not in text and "<|im_start|>" not in text


@pytest.mark.slow
def test_repl_keeps_history_survives_ctrl_c_and_resets(from_run, monkeypatch, capsys):
    """Multi-turn history, the --system_prompt override, Ctrl-C mid-answer, /reset and /exit."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class CtrlCAfterThreeTokens(LogitsProcessor):  # the user presses Ctrl-C while the answer streams
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls > 3:
                raise KeyboardInterrupt
            return scores

    prompts = []
    real = from_run.model.generate

    def recording_generate(**kw):
        prompts.append(from_run.tokenizer.decode(kw["input_ids"][0]))
        if len(prompts) == 2:
            kw["logits_processor"] = LogitsProcessorList([CtrlCAfterThreeTokens()])
        return real(**kw)

    lines = iter(["What is anemia?", "What causes gout?", "How is it treated?", "/reset", "What is asthma?",
                  "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(from_run.model, "generate", recording_generate)
    repl(from_run, preset("greedy", max_new_tokens=8), system_prompt=CUSTOM_PROMPT)

    out, err = capsys.readouterr()
    assert len(prompts) == 4 and next(lines) == "never read"
    assert "(stopped)" in err
    first_reply = out.split("assistant> ")[1].strip()
    assert first_reply and first_reply in prompts[2]
    assert "What is anemia?" in prompts[2] and "What causes gout?" not in prompts[2]  # the stopped turn is dropped
    assert "What is anemia?" not in prompts[3] and "What is asthma?" in prompts[3]    # /reset
    assert all(p.count(CUSTOM_PROMPT) == 1 and DEFAULT_SYSTEM_PROMPT not in p for p in prompts)
