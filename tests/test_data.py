"""CSV validation (each bad-input class), the split, chat formatting and answer-only masking,
with the real SmolLM2 tokenizer and chat template."""

from __future__ import annotations

import gzip

import pytest
import torch

from medlora.cli import main
from medlora.errors import MedloraError
from medlora.prompts import DEFAULT_SYSTEM_PROMPT
from medlora.data import (IGNORE_INDEX, encode_example, encode_frame, load_qa_csv, make_collator, prompt_text,
                          split)

from conftest import write

GOOD = "qtype,Question,Answer\ninformation,What is anemia?,A low red blood cell count.\n"


# ------------------------------------------------------------------ bad input, through the CLI

BAD_INPUTS = {
    "missing": (None, "file not found"),
    "directory": ("DIR", "not a file"),
    "empty": ("", "file is empty"),
    "whitespace": ("\n\n  \n", "file is empty"),
    "header_only": ("qtype,Question,Answer\n", "no data rows"),
    "missing_columns": ("qtype,Query,Response\ninformation,a,b\n", "missing column(s) Question, Answer"),
    "semicolon": ("qtype;Question;Answer\ninformation;What is it?;A thing, really.\n", "semicolon-separated"),
    "tab": ("qtype\tQuestion\tAnswer\ninformation\tWhat?\tThat.\n", "tab-separated"),
    "no_usable_rows": ("qtype,Question,Answer\ninformation,,x\nsymptoms,What?,  \n", "no usable rows"),
    "binary": (gzip.compress(GOOD.encode()), "not"),
    "shifted_columns": ("qtype,Question,Answer\ninformation,What is it?,A thing.\ninformation,What is anemia?,"
                        "Too few red cells.,https://medlineplus.gov/anemia.html\n",
                        "line 3 has 4 fields but the header has 3; quote cells that contain a comma"),
    "latin1": ("qtype,Question,Answer\ninformation,What is caf\u00e9?,x\n".encode("latin-1"), "not UTF-8 text"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_exit_2_and_no_output_folder(kind, tmp_path, capsys):
    content, message = BAD_INPUTS[kind]
    path = tmp_path / f"{kind}.csv"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        write(path, content)
    out_dir = tmp_path / "run"
    code = main(["train", "--data", str(path), "--model", "smollm2-135m", "--output_dir", str(out_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"medlora: error: {path}") and message in err[0], err
    assert "Traceback" not in err[0]
    assert not out_dir.exists()
    # `medlora data check` reports the same problem the same way
    assert main(["data", "check", str(path), "--model", "smollm2-135m"]) == 2
    assert message in capsys.readouterr().err


def test_binary_file_message_names_the_problem(tmp_path):
    with pytest.raises(MedloraError, match=r"not a text CSV file|not UTF-8 text"):
        load_qa_csv(write(tmp_path / "x.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"))
    with pytest.raises(MedloraError, match=r"invalid byte 0xe9 on line 2"):
        load_qa_csv(write(tmp_path / "y.csv", "qtype,Question,Answer\ni,caf\u00e9?,x\n".encode("latin-1")))


def test_forgiving_csv_features(tmp_path):
    text = ('\ufeffQType , question,ANSWER,source\r\n'
            'information,"What is it,\r\nreally?","Line one.\r\nLine two, with ""quotes""."\r\n'
            ',What else?,Something.\r\n'
            'symptoms,,No question here.\r\n'
            'symptoms,Empty answer?,   \r\n')
    df, report = load_qa_csv(write(tmp_path / "bom.csv", text.encode("utf-8")))
    assert list(df.columns) == ["qtype", "Question", "Answer"]
    assert report.rows_read == 4 and report.dropped_empty == 2 and len(df) == 2
    assert df.loc[0, "Question"] == "What is it,\r\nreally?"
    assert df.loc[0, "Answer"].endswith('with "quotes".')
    assert df.loc[1, "qtype"] == "unknown"


def test_spreadsheet_exports_load_as_their_rows(tmp_path):
    """Files that spreadsheet programs write: trailing commas on every row (the cells end, the columns do not
    shift), old Mac line ends (bare CR), and UTF-16 with a byte order mark (Excel's "Unicode Text")."""
    rows = [["information", "What is it?", "A thing."], ["symptoms", "What are the signs?", "Pale skin, fatigue."]]
    body = "".join(f'{q},{a},"{b}"' + "{end}" for q, a, b in rows)
    cases = {"trailing.csv": ("qtype,Question,Answer\n" + body.replace("{end}", ",\n")).encode(),
             "mac.csv": ("qtype,Question,Answer\r" + body.replace("{end}", "\r")).encode(),
             "utf16.csv": ("qtype,Question,Answer\r\n" + body.replace("{end}", "\r\n")).encode("utf-16")}
    for name, raw in cases.items():
        df, report = load_qa_csv(write(tmp_path / name, raw))
        assert df.values.tolist() == rows and report.rows_read == 2, name


def test_sample_and_medquad_load(sample_csv, medquad_csv):
    df, report = load_qa_csv(sample_csv)
    assert len(df) >= 100 and report.dropped_empty == 0
    assert len(report.qtype_counts) == 16
    big, big_report = load_qa_csv(medquad_csv)
    assert big_report.rows_read == 15566 and len(big_report.qtype_counts) == 16


# ------------------------------------------------------------------ split

def test_split_is_deterministic_disjoint_and_sized(sample_csv):
    df, _ = load_qa_csv(sample_csv)
    tr1, ev1 = split(df, 0.05, 42)
    tr2, ev2 = split(df, 0.05, 42)
    assert tr1.equals(tr2) and ev1.equals(ev2)
    assert len(ev1) == 8 and len(tr1) + len(ev1) == len(df)
    assert not set(ev1["Question"]) & set(tr1["Question"])
    _, ev3 = split(df, 0.05, 43)
    assert not ev1.equals(ev3)
    with pytest.raises(MedloraError, match="cannot split"):
        split(df.iloc[:1], 0.05, 42)


# ------------------------------------------------------------------ formatting and masking

Q, A = "What are the symptoms of asthma?", "Wheezing, coughing, chest tightness and shortness of breath."


def test_prompt_uses_the_models_chat_template(tokenizer):
    text = prompt_text(tokenizer, DEFAULT_SYSTEM_PROMPT, Q)
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
                    f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n")
    ex = encode_example(tokenizer, DEFAULT_SYSTEM_PROMPT, Q, A, 512)
    reference = tokenizer.apply_chat_template(
        [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": Q}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ex["input_ids"][: ex["prompt_len"]] == list(reference)


def test_answer_only_labels_keep_end_of_turn(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the hard case: pad == eos
    ex = encode_example(tokenizer, DEFAULT_SYSTEM_PROMPT, Q, A, 512)
    ids, labels, n = ex["input_ids"], ex["labels"], ex["prompt_len"]
    assert len(ids) == len(labels) == len(ex["attention_mask"])
    assert all(l == IGNORE_INDEX for l in labels[:n])  # the prompt is fully masked
    assert all(l in (IGNORE_INDEX, t) for l, t in zip(labels, ids))  # a label is -100 or the token itself
    trained = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tokenizer.decode(trained) == A + "<|im_end|>"  # exactly the answer + end-of-turn
    assert trained[-1] == tokenizer.eos_token_id
    # the answer tokens are contiguous and start right after the prompt
    first = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
    assert first == n


def test_collator_pads_right_and_never_trains_on_padding(tokenizer):
    short = encode_example(tokenizer, DEFAULT_SYSTEM_PROMPT, Q, "Wheezing.", 512)
    long = encode_example(tokenizer, DEFAULT_SYSTEM_PROMPT, Q, A, 512)
    keep = ("input_ids", "attention_mask", "labels")
    batch = make_collator(tokenizer)([{k: e[k] for k in keep} for e in (short, long)])
    L = len(long["input_ids"])
    assert batch["input_ids"].shape == (2, L)
    pad = L - len(short["input_ids"])
    assert pad > 0
    assert torch.all(batch["labels"][0, -pad:] == IGNORE_INDEX)
    assert torch.all(batch["attention_mask"][0, -pad:] == 0)
    assert torch.all(batch["input_ids"][0, -pad:] == tokenizer.pad_token_id)
    # the short answer's own end-of-turn token (same id as pad) is still a label
    assert batch["labels"][0, len(short["input_ids"]) - 2].item() == tokenizer.eos_token_id


def test_truncation_cuts_the_answer_never_the_prompt(tokenizer):
    full = encode_example(tokenizer, DEFAULT_SYSTEM_PROMPT, Q, A, 512)
    n = full["prompt_len"]
    cut = encode_example(tokenizer, DEFAULT_SYSTEM_PROMPT, Q, A, n + 3)
    assert cut["truncated"] and len(cut["input_ids"]) == n + 3
    assert cut["input_ids"][:n] == full["input_ids"][:n]
    assert cut["labels"][n:] == full["input_ids"][n:n + 3]
    assert encode_example(tokenizer, DEFAULT_SYSTEM_PROMPT, Q, A, n) is None  # no room for any answer token
    assert not full["truncated"]


def test_encode_frame_counts_skips_and_truncations(tokenizer, sample_csv):
    df, _ = load_qa_csv(sample_csv)
    df = df.iloc[:10].copy()
    df.loc[0, "Question"] = "why? " * 600  # prompt alone longer than max_seq_len
    enc = encode_frame(tokenizer, df, DEFAULT_SYSTEM_PROMPT, 200)
    assert enc.skipped_long_prompt == 1 and len(enc.examples) == 9
    assert enc.truncated == sum(ex["full_len"] > 200 for ex in enc.examples) > 0
    assert all(len(ex["input_ids"]) <= 200 for ex in enc.examples)


def test_tokenizing_on_every_core_gives_the_same_examples_and_leaves_the_users_setting(tokenizer, sample_csv,
                                                                                        monkeypatch):
    """medlora's own TOKENIZERS_PARALLELISM=false (set so that forked processes stay quiet) is switched on around
    the batch calls only, with the same tokens; a value the user set is left alone."""
    import os

    from medlora import cpu

    df, _ = load_qa_csv(sample_csv)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.delenv(cpu._OUR_TOKENIZERS_DEFAULT, raising=False)
    cpu.quiet_tokenizers_after_fork()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    seen = []
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, _call=type(tokenizer).__call__, **k: (
        seen.append(os.environ["TOKENIZERS_PARALLELISM"]), _call(self, *a, **k))[1])
    parallel = encode_frame(tokenizer, df, DEFAULT_SYSTEM_PROMPT, 512).examples
    assert seen == ["true", "true"] and os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.delenv(cpu._OUR_TOKENIZERS_DEFAULT)  # now "false" is the user's own
    assert encode_frame(tokenizer, df, DEFAULT_SYSTEM_PROMPT, 512).examples == parallel
    assert seen[2:] == ["false", "false"]


def test_data_check_reports_statistics(sample_csv, capsys):
    assert main(["data", "check", str(sample_csv), "--model", "smollm2-135m", "--max_seq_len", "200"]) == 0
    out = capsys.readouterr().out
    assert "150 read, 150 kept" in out and "p50" in out and "answers truncated" in out and "support groups" in out


@pytest.mark.slow
def test_data_check_on_medquad_reports_truncation_rate(medquad_csv, capsys):
    import json

    assert main(["data", "check", str(medquad_csv), "--model", "smollm2-135m", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows_kept"] == 15566 and stats["max_seq_len"] == 512
    assert 0.05 < stats["truncated_rate"] < 0.5  # MedQuAD answers are long: a real share is cut at 512
    assert stats["tokens"]["max"] > 512
