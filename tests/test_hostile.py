"""Hostile and awkward input across every subcommand: each case ends with exit code 2, exactly one
`medlora: error:` line, no traceback, and the file system as it was. Plus property-based fuzzing (hypothesis)
of the configuration layer and the CSV reader: the only outcomes are success or a one-line error."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medlora.cli import build_parser, main, parse_args
from medlora.config import TrainConfig, build_config, save_config
from medlora.data import load_qa_csv
from medlora.errors import MedloraError

GOOD_ROWS = "qtype,Question,Answer\n" + "".join(f"info,What is condition {i}?,Answer {i}.\n" for i in range(20))


def message_lines(err: str) -> list[str]:
    """stderr without progress bars (model loading shows one before a late error): what a person reads."""
    parts = [p.strip() for line in err.splitlines() for p in line.split("\r")]
    return [p for p in parts if p and not re.search(r"\d+%\|", p)]


def snapshot(root: Path) -> dict:
    """Every path with its size and modification time (files; a folder counts by what is in it)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


class Ctx:
    """Files the cases point at, made fresh in each test's folder."""

    def __init__(self, root: Path, tiny: Path):
        self.root, self.tiny = root, tiny
        self.csv = root / "good.csv"
        self.csv.write_text(GOOD_ROWS)
        self.file = root / "a_file.txt"
        self.file.write_text("x")
        self.empty_dir = root / "empty"
        self.empty_dir.mkdir()
        self.model_dir = root / "model"  # a model folder, not a run
        self.model_dir.mkdir()
        (self.model_dir / "config.json").write_text("{}")

    def write(self, name: str, content) -> str:
        path = self.root / name
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return str(path)

    def run_folder(self, finished: bool, **cfg) -> str:
        """A run folder as training leaves it (configuration, run info; finished: metrics too)."""
        run = self.root / ("finished" if finished else "unfinished")
        run.mkdir()
        save_config(build_config(data=str(self.csv), model=str(self.tiny), max_steps=4, **cfg), run / "config.yaml")
        (run / "run_info.json").write_text("{}")
        if finished:
            (run / "metrics.json").write_text('{"train_steps": 4}')
        return str(run)


def train(c: Ctx, *flags) -> list[str]:
    return ["train", "--data", str(c.csv), "--model", str(c.tiny), "--output_dir", str(c.root / "out"), *flags]


CASES = {
    # numbers: infinite, NaN, out of range, wrong type
    "lr_inf": lambda c: train(c, "--learning_rate", "inf"),
    "lr_nan": lambda c: train(c, "--learning_rate", "nan"),
    "lr_negative": lambda c: train(c, "--learning_rate", "-1e-4"),
    "max_steps_huge_float": lambda c: train(c, "--max_steps", "1e40"),
    "max_steps_huge_int": lambda c: train(c, "--max_steps", "99999999999999999999999"),
    "max_steps_fraction": lambda c: train(c, "--max_steps", "2.5"),
    "seed_negative": lambda c: train(c, "--seed", "-1"),
    "lora_r_zero": lambda c: train(c, "--lora_r", "0"),
    "test_size_above_one": lambda c: train(c, "--test_size", "1.5"),
    "epochs_absurd": lambda c: train(c, "--num_train_epochs", "1e9"),
    "batch_not_a_number": lambda c: train(c, "--per_device_train_batch_size", "abc"),
    "dropout_one": lambda c: train(c, "--lora_dropout", "1"),
    "empty_system_prompt": lambda c: train(c, "--system_prompt", "  "),
    "empty_output_dir": lambda c: train(c)[:-1] + [""],
    "lr_beyond_float32": lambda c: train(c, "--learning_rate", "1e300"),
    "lora_r_absurd": lambda c: train(c, "--lora_r", "2147483647"),
    "threads_absurd": lambda c: train(c, "--num_threads", "100000"),
    "optim_unknown": lambda c: train(c, "--optim", "sgd_bogus"),
    "optim_needs_a_package": lambda c: train(c, "--optim", "adamw_8bit"),
    "output_dir_name_too_long": lambda c: train(c)[:-1] + [str(c.root / ("x" * 300))],
    # argparse: invalid choices, prefixes, missing values, unknown commands
    "precision_choice": lambda c: train(c, "--precision", "fp16"),
    "scheduler_choice": lambda c: train(c, "--lr_scheduler_type", "constant"),
    "flag_prefix": lambda c: train(c, "--learn", "1e-3"),
    "flag_typo": lambda c: train(c, "--learing_rate", "1e-3"),
    "flag_without_value": lambda c: train(c, "--max_steps"),
    "unknown_command": lambda c: ["fine-tune"],
    "unknown_data_command": lambda c: ["data", "clean", str(c.csv)],
    "no_data": lambda c: ["train", "--model", str(c.tiny), "--output_dir", str(c.root / "out")],
    # YAML configuration files
    "yaml_int_keys": lambda c: ["train", "--config", c.write("k.yaml", "{1: 2, 3: 4}")],
    "yaml_list": lambda c: ["train", "--config", c.write("l.yaml", "- a\n- b\n")],
    "yaml_unknown_key": lambda c: ["train", "--config", c.write("u.yaml", "learning_rat: 1e-4\n")],
    "yaml_nested_value": lambda c: ["train", "--config", c.write("n.yaml", "learning_rate: {a: 1}\n")],
    "yaml_syntax": lambda c: ["train", "--config", c.write("s.yaml", "learning_rate: [1, 2\n")],
    "yaml_inf": lambda c: ["train", "--config", c.write("i.yaml", f"data: {c.csv}\nlearning_rate: .inf\n")],
    "yaml_missing": lambda c: ["train", "--config", str(c.root / "nope.yaml")],
    "yaml_is_a_folder": lambda c: ["train", "--config", str(c.empty_dir)],
    "yaml_is_a_device": lambda c: ["train", "--config", "/dev/null"],
    "yaml_binary": lambda c: ["train", "--config", c.write("b.yaml", b"\xff\xfe\x00\x01")],
    # CSV files
    "csv_missing": lambda c: ["train", "--data", str(c.root / "nope.csv")],
    "csv_is_a_folder": lambda c: ["train", "--data", str(c.empty_dir)],
    "csv_nul_after_64k": lambda c: train(c)[:1] + ["--data", c.write("nul.csv", GOOD_ROWS.encode() + b"a" * 70000
                                                                     + b"\x00\n")] + train(c)[3:],
    "csv_duplicate_header_case": lambda c: ["train", "--data", c.write("dup.csv", "qtype,Question,question,Answer\n"
                                                                       "a,b,c,d\n")],
    "csv_semicolons": lambda c: ["train", "--data", c.write("semi.csv", "qtype;Question;Answer\na;b;c\n")],
    "csv_latin1": lambda c: ["train", "--data", c.write("latin.csv", "qtype,Question,Answer\na,caf\xe9?,b\n"
                                                        .encode("latin-1"))],
    "csv_header_only": lambda c: ["train", "--data", c.write("h.csv", "qtype,Question,Answer\n")],
    "csv_shifted_columns": lambda c: ["train", "--data", c.write("shift.csv", "qtype,Question,Answer\n"
                                                                 "info,What is A?,Answer A,https://a.org\n")],
    "csv_name_too_long": lambda c: ["train", "--data", str(c.root / ("x" * 300 + ".csv"))],
    "check_no_row_fits": lambda c: ["data", "check", str(c.csv), "--model", str(c.tiny), "--max_seq_len", "16"],
    "check_name_too_long": lambda c: ["data", "check", str(c.root / ("x" * 300 + ".csv"))],
    "csv_one_row": lambda c: ["train", "--data", c.write("one.csv", "qtype,Question,Answer\na,b?,c\n"),
                              "--model", str(c.tiny), "--output_dir", str(c.root / "out")],
    # run folders and --resume
    "output_under_a_file": lambda c: train(c)[:-1] + [str(c.file / "run")],
    "resume_missing": lambda c: ["train", "--resume", str(c.root / "nope")],
    "resume_not_a_run": lambda c: ["train", "--resume", str(c.empty_dir)],
    "resume_changed_flag": lambda c: ["train", "--resume", c.run_folder(False), "--learning_rate", "1e-3"],
    "resume_finished": lambda c: ["train", "--resume", c.run_folder(True)],
    "resume_no_checkpoint": lambda c: ["train", "--resume", c.run_folder(False)],
    "resume_elsewhere": lambda c: ["train", "--resume", c.run_folder(False), "--output_dir", str(c.root / "other")],
    # data check
    "check_missing": lambda c: ["data", "check", str(c.root / "nope.csv")],
    "check_max_seq_len": lambda c: ["data", "check", str(c.csv), "--max_seq_len", "0"],
    "check_max_seq_len_text": lambda c: ["data", "check", str(c.csv), "--max_seq_len", "long"],
    # chat
    "chat_nothing": lambda c: ["chat"],
    "chat_empty_question": lambda c: ["chat", "--model", str(c.tiny), "-q", ""],
    "chat_negative_tokens": lambda c: ["chat", "--model", str(c.tiny), "-q", "hi", "--max_new_tokens", "-5"],
    "chat_zero_temperature": lambda c: ["chat", "--model", str(c.tiny), "-q", "hi", "--mode", "sample",
                                        "--temperature", "0"],
    "chat_top_p": lambda c: ["chat", "--model", str(c.tiny), "-q", "hi", "--top_p", "2"],
    "chat_mode": lambda c: ["chat", "--model", str(c.tiny), "-q", "hi", "--mode", "beam"],
    "chat_seed_llamacpp_reads_as_random": lambda c: ["chat", "--model", str(c.tiny), "-q", "hi", "--mode", "sample",
                                                     "--seed", str(2**32 - 1)],
    "chat_seed_negative": lambda c: ["chat", "--model", str(c.tiny), "-q", "hi", "--seed", "-5"],
    "chat_greedy_with_temperature": lambda c: ["chat", "--model", str(c.tiny), "-q", "hi", "--mode", "greedy",
                                               "--temperature", "0.5"],
    "chat_missing_folder": lambda c: ["chat", str(c.root / "nope"), "-q", "hi"],
    "chat_not_a_run": lambda c: ["chat", str(c.empty_dir), "-q", "hi"],
    "chat_empty_emergency_number": lambda c: ["chat", "--model", str(c.tiny), "-q", "hi", "--emergency_number", ""],
    "chat_remote_code": lambda c: ["chat", "--model", c.remote_code(), "-q", "hi"],
    # eval and merge
    "eval_missing": lambda c: ["eval", str(c.root / "nope")],
    "eval_not_a_run": lambda c: ["eval", str(c.model_dir)],
    "eval_negative_samples": lambda c: ["eval", str(c.model_dir), "--samples", "-1"],
    "eval_zero_safety_samples": lambda c: ["eval", str(c.model_dir), "--safety", "--safety_samples", "0"],
    "eval_zero_tokens": lambda c: ["eval", str(c.model_dir), "--max_new_tokens", "0"],
    # serve: refused before the port opens
    "serve_zero_threads": lambda c: ["serve", "--model", str(c.tiny), "--threads", "0", "--port", "0"],
    "serve_key_not_ascii": lambda c: ["serve", "--model", str(c.tiny), "--api_key", "p\u00e4ssw\u00f6rd",
                                      "--port", "0"],
    "serve_gguf_with_hf": lambda c: ["serve", c.write("m.gguf", b"GGUF"), "--backend", "hf", "--port", "0"],
    "serve_a_plain_file": lambda c: ["serve", str(c.file), "--port", "0"],
    "train_torchrun_option": lambda c: ["train", "--data", str(c.csv), "--nproc_per_node", "2"],
    "merge_missing": lambda c: ["merge", str(c.root / "nope")],
    "merge_not_a_run": lambda c: ["merge", str(c.model_dir)],
    "merge_a_folder_inside_a_run": lambda c: ["merge", c.inside_run("adapter")],
    "chat_a_folder_inside_a_run": lambda c: ["chat", c.inside_run("export"), "-q", "hi"],
}


def _remote_code(self) -> str:
    """A model folder whose config says it needs its own Python code (auto_map)."""
    folder = self.root / "remote"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "medlora_custom", "auto_map": {"AutoConfig": '
                                        '"configuration_custom.CustomConfig", "AutoModelForCausalLM": '
                                        '"modeling_custom.CustomLM"}}')
    return str(folder)


Ctx.remote_code = _remote_code


def _inside_run(self, name: str) -> str:
    """A folder inside a run folder (RUN/adapter, RUN/export), given where the run is meant."""
    inside = Path(self.run_folder(True)) / name
    inside.mkdir()
    return str(inside)


Ctx.inside_run = _inside_run


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_one_line_exit_2_and_changes_nothing(case, tmp_path, tiny_model_dir, capsys, monkeypatch):
    ctx = Ctx(tmp_path, tiny_model_dir)
    argv = CASES[case](ctx)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = message_lines(err)
    assert code == 2, (argv, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("medlora: error: "), err[-2000:]
    assert "Traceback" not in err + out and len(lines[0]) < 600
    assert snapshot(tmp_path) == before, "the file system changed"


def test_a_config_that_exists_but_is_no_file_is_not_called_missing(tmp_path, capsys):
    for path, said in ((tmp_path / "nope.yaml", "config file not found"), (tmp_path, "not a file"),
                       (Path("/dev/null"), "not a file")):
        assert main(["train", "--config", str(path)]) == 2
        assert said in capsys.readouterr().err


def test_a_folder_inside_a_run_names_the_run(tmp_path, tiny_model_dir, capsys):
    for command in (["merge"], ["eval"], ["export"], ["train", "--resume"]):
        (tmp_path / command[0]).mkdir()
        inside = Ctx(tmp_path / command[0], tiny_model_dir).inside_run("adapter")
        assert main([*command, inside]) == 2
        run = str(Path(inside).parent)
        assert f"{inside}: a folder inside the run folder {run}; give the run folder ({run})" in capsys.readouterr().err


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40



@pytest.mark.parametrize("argv", [
    ["train", "--data", "{missing}.csv"],
    ["train", "--data", "{csv}", "--model", "{missing}"],
    ["train", "--data", "{csv}", "--output_dir", "{file}/run"],
    ["train", "--data", "{csv}", "--nproc", "2", "--model", "{missing}"],
    ["chat", "{missing}", "-q", "hi"],
    ["chat", "--model", "{missing}", "-q", "hi"],
    ["eval", "{missing}"],
])
def test_wrong_paths_fail_before_torch_loads(argv, tmp_path):
    """A mistyped path is reported before torch, transformers and peft load (about 9 s on a 2-core CPU): a fresh
    interpreter runs the command and reports whether torch was imported by the time the error came."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "ok.csv").write_text(GOOD_ROWS)
    args = [a.format(missing=tmp_path / "missing", csv=tmp_path / "ok.csv", file=tmp_path / "file") for a in argv]
    code = ("import sys; from medlora.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr[-2000:]
    assert len(message_lines(proc.stderr)) == 1 and "Traceback" not in proc.stderr, proc.stderr

# ---------------------------------------------------------------- damaged run folders and the REPL's stdin

@pytest.mark.parametrize("command", [["chat", "-q", "hi"], ["eval", "--samples", "0"], ["merge"]])
def test_truncated_adapter_is_one_line_in_every_command(command, tiny_run, tmp_path, capsys):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = snapshot(run)
    assert main([command[0], str(run), *command[1:]]) == 2
    err = message_lines(capsys.readouterr().err)
    assert len(err) == 1 and "the adapter cannot be loaded" in err[0] and "may be damaged" in err[0]
    assert snapshot(run) == before


@pytest.mark.parametrize("command", [["chat", "-q", "hi", "--backend", "hf"], ["merge"]])
def test_a_checkpoint_deleted_while_it_loads_is_one_line_naming_the_newest(command, tiny_run, tmp_path, capsys,
                                                                          monkeypatch):
    """A run that is training deletes its older checkpoints as it saves: one that chat or merge is loading at that
    moment is one line naming the run's newest complete checkpoint, not a traceback about a missing file."""
    import medlora.model as model_module
    from medlora.rundir import RunDir

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    newest = RunDir(run).latest_complete_checkpoint()
    older = Path(shutil.copytree(newest, run / "checkpoint-1"))
    real_load = model_module.load_model

    def load_while_rotating(*args, **kwargs):
        shutil.rmtree(older)  # the trainer's rotation, between the tokenizer and the adapter
        return real_load(*args, **kwargs)

    monkeypatch.setattr(model_module, "load_model", load_while_rotating)
    assert main([command[0], str(older), *command[1:]]) == 2
    err = message_lines(capsys.readouterr().err)
    assert err == [f"medlora: error: {older}: this checkpoint was deleted while it loaded (a run that is training "
                   f"keeps only its newest checkpoints and deletes older ones as it saves); its newest complete "
                   f"checkpoint is {newest}"]
    assert not (run / "merged_model-checkpoint-1").exists()


def test_repl_survives_bytes_that_are_not_utf8(tiny_run):
    proc = subprocess.run([sys.executable, "-m", "medlora", "chat", str(tiny_run), "--max_new_tokens", "2"],
                          input=b"\xff\xfe\xfa broken\nhello\n/exit\n", capture_output=True, timeout=300)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0 and "Traceback" not in err
    assert "not UTF-8 text" in err and proc.stdout.count(b"assistant> ") == 1


def test_resume_from_another_working_directory_and_with_the_absolute_path(tiny_run, tmp_path, monkeypatch, capsys):
    """config.yaml stores the data file's absolute path: --resume works from anywhere, and giving that path
    again (relative or absolute) is not a changed flag."""
    import yaml as _yaml

    saved = _yaml.safe_load((tiny_run / "config.yaml").read_text())["data"]
    assert Path(saved).is_absolute()
    monkeypatch.chdir(Path(saved).parent)
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    (run / "metrics.json").unlink()
    shutil.rmtree(run / "adapter")
    assert main(["train", "--resume", str(run), "--data", Path(saved).name]) == 0


# ---------------------------------------------------------------- property-based fuzzing

FIELDS = [f.name for f in fields(TrainConfig)]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                   st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                              max_size=2))
KEYS = st.one_of(st.sampled_from(FIELDS), st.text(max_size=12), st.integers(), st.booleans())
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def one_line_error_or_success(call):
    try:
        call()
    except MedloraError as e:
        assert "\n" not in str(e).strip() and str(e).strip(), repr(str(e))


@FUZZ
@given(mapping=st.dictionaries(KEYS, VALUES, max_size=6))
def test_fuzz_yaml_configs(mapping, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    try:
        path.write_text(yaml.safe_dump(mapping, allow_unicode=True))
    except yaml.YAMLError:
        return  # not representable as YAML: nothing a user could write
    one_line_error_or_success(lambda: build_config(yaml_path=str(path)))


@FUZZ
@given(field=st.sampled_from([f for f in FIELDS if f not in ("target_modules",)]),
       value=st.one_of(st.text(max_size=25), st.sampled_from(["inf", "-inf", "nan", "1e400", "-0", "1e-400",
                                                             "99999999999999999999", "0x10", "1_000", " 3 ",
                                                             "true", "None", ""])))
def test_fuzz_flag_values(field, value):
    def call():
        args = parse_args(build_parser(), ["train", f"--{field}", value])
        build_config(args)

    one_line_error_or_success(call)


HEADERS = st.lists(st.sampled_from(["qtype", "Question", "Answer", "question", "ANSWER", " qtype ", "extra", "",
                                    "Question", "a,b", '"Answer"']), min_size=0, max_size=5)
CELLS = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)


@FUZZ
@given(header=HEADERS, rows=st.lists(st.lists(CELLS, max_size=5), max_size=5),
       sep=st.sampled_from([",", ";", "\t"]), quote=st.booleans())
def test_fuzz_csv_structure(header, rows, sep, quote, tmp_path_factory):
    def fmt(cells):
        return sep.join(f'"{c}"' if quote else c for c in cells)

    path = tmp_path_factory.mktemp("csv") / "f.csv"
    path.write_text("\n".join([fmt(header), *map(fmt, rows)]) + "\n", encoding="utf-8")
    one_line_error_or_success(lambda: load_qa_csv(path))


@FUZZ
@given(raw=st.binary(max_size=300), prefix=st.sampled_from([b"", b"qtype,Question,Answer\n"]))
def test_fuzz_csv_bytes(raw, prefix, tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes") / "f.csv"
    path.write_bytes(prefix + raw)
    one_line_error_or_success(lambda: load_qa_csv(path))


# ---------------------------------------------------------------- training that goes wrong, and two at once

def test_a_loss_that_becomes_nan_stops_training_before_its_checkpoint(sample_csv, tiny_model_dir, tmp_path, capsys):
    import json

    out = tmp_path / "run"
    code = main(["train", "--data", str(sample_csv), "--model", str(tiny_model_dir), "--output_dir", str(out),
                 "--max_steps", "30", "--gradient_accumulation_steps", "1", "--save_steps", "1",
                 "--learning_rate", "1e30", "--warmup_ratio", "0", "--max_eval_samples", "2"])
    lines = message_lines(capsys.readouterr().err)
    assert code == 2 and lines[-1].startswith("medlora: error: training stopped at step ")
    assert "(not a finite number)" in lines[-1] and "lower --learning_rate" in lines[-1]
    bad = int(re.search(r"step (\d+)", lines[-1]).group(1))
    assert 1 <= bad < 30 and not (out / "metrics.json").exists() and not (out / "adapter").exists()
    from safetensors.torch import load_file
    for ckpt in out.glob("checkpoint-*"):  # every checkpoint kept is a good one, and older than the bad step
        assert int(ckpt.name.split("-")[1]) < bad
        assert all(t.isfinite().all() for t in load_file(ckpt / "adapter_model.safetensors").values())
    for path in out.rglob("*.json"):  # every JSON file stays valid JSON (no NaN literal)
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


def test_a_misspelt_target_module_beside_a_good_one_is_refused(sample_csv, tiny_model_dir, tmp_path, capsys):
    """peft only complains when no name matches: v_prj beside q_proj would train q_proj alone, silently."""
    out = tmp_path / "run"
    assert main(["train", "--data", str(sample_csv), "--model", str(tiny_model_dir), "--output_dir", str(out),
                 "--target_modules", "q_proj,v_prj", "--max_steps", "1"]) == 2
    last = message_lines(capsys.readouterr().err)[-1]
    assert last.startswith("medlora: error: --target_modules: no layer named v_prj in this model (its linear "
                           "layers: ") and "v_proj" in last
    assert not out.exists()  # a new run that stopped before its first checkpoint leaves no folder behind


def test_chat_refuses_a_question_longer_than_the_context_and_a_temperature_means_sampling(tiny_model_dir, capsys):
    ask = ["chat", "--model", str(tiny_model_dir), "--backend", "hf", "--max_new_tokens", "2", "-q"]
    assert main([*ask, "word " * 2100]) == 2  # the tiny Llama holds 2,048 positions
    last = message_lines(capsys.readouterr().err)[-1]
    assert re.fullmatch(r"medlora: error: the question takes \d+ tokens with the system prompt, and this model's "
                        r"context holds 2048: ask a shorter question", last), last
    assert main([*ask, "hi", "--temperature", "0.9"]) == 0
    assert re.search(r"\[base model .*, sample, seed \d+\]", capsys.readouterr().err)


def test_two_runs_started_together_into_one_folder_get_two_complete_folders(sample_csv, tiny_model_dir, tmp_path):
    out = tmp_path / "runs" / "same"
    cmd = [sys.executable, "-m", "medlora", "train", "--data", str(sample_csv), "--model", str(tiny_model_dir),
           "--output_dir", str(out), "--max_steps", "2", "--gradient_accumulation_steps", "1",
           "--max_eval_samples", "2"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-1500:] for r in results]
    folders = {Path(r[0].strip().splitlines()[-1]) for r in results}
    assert len(folders) == 2 and out in folders, folders  # one got the folder, the other a timestamped sibling
    for folder in folders:
        assert (folder / "metrics.json").is_file() and (folder / "adapter" / "adapter_model.safetensors").is_file()
        assert not (folder / ".medlora-lock").exists()


FULL_DISK = {  # the command, and what it was writing when the disk filled up
    "merge": (["merge"], "merged_model"),
    "eval": (["eval", "--backend", "hf", "--samples", "1", "--max_new_tokens", "4", "--show", "1", "--no_forgetting"],
             "eval/metrics.json"),
    "eval_gguf": (["eval", "--samples", "1", "--max_new_tokens", "4", "--no_forgetting"], "export/run-q8_0.gguf"),
}


@pytest.mark.parametrize("case", FULL_DISK)
def test_a_full_disk_is_one_line_and_leaves_no_half_written_file(case, tiny_run, tmp_path):
    """`medlora merge` and `medlora eval` on a disk that fills up while they write (a file size limit on the
    process: writes fail with EFBIG, as they fail with ENOSPC on a full disk): one line naming what could not be
    written, exit code 2, and no half-written folder or file beside the run's own."""
    import resource

    # without the GGUF an earlier test may have cached in the shared run: eval_gguf's first use makes it
    run = Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("export")))
    before = {p.relative_to(run) for p in run.rglob("*")}
    command, written = FULL_DISK[case]

    def full_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    proc = subprocess.run([sys.executable, "-m", "medlora", command[0], str(run), *command[1:]],
                          capture_output=True, text=True, preexec_fn=full_disk, timeout=600)
    lines = message_lines(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith(f"medlora: error: cannot write {run / written}: File too large"), lines[-1]
    assert {p.relative_to(run) for p in run.rglob("*")} <= before  # nothing half-written is left


def test_write_failures_are_told_apart_from_other_errors():
    import errno
    import os

    from medlora.errors import write_failure

    assert write_failure(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == "No space left on device"
    assert write_failure(OSError(errno.EDQUOT, "x")) == "Disk quota exceeded"
    # safetensors' text, and torch.save's C++ stream, whose error comes in the context of the reported one
    assert write_failure(RuntimeError("Error while serializing: I/O error: File too large (os error 27)")) == \
        "File too large"
    try:
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    except RuntimeError as e:
        assert write_failure(e) == "a write failed"
    assert write_failure(OSError(errno.ENOENT, "No such file or directory")) is None
    assert write_failure(ValueError("the loss became nan")) is None


def test_running_out_of_memory_is_one_line_naming_the_checkpoint_and_the_way_on(tiny_run, tmp_path):
    """torch's own error for an allocation the machine cannot give (asked for here with a size no machine has),
    as training would meet it: one line with the last complete checkpoint and how to go on with less memory; a
    checkpoint it was writing is removed. Any other error is not taken for it."""
    import torch

    from medlora.errors import memory_failure
    from medlora.rundir import RunDir, is_complete
    from medlora.training.stopping import stopped_here

    with pytest.raises(RuntimeError) as caught:
        torch.empty(2**50, dtype=torch.uint8)  # 1,126 TB
    assert memory_failure(caught.value) == "an allocation of 1125899.91 GB failed"
    assert memory_failure(MemoryError()) == "an allocation failed"
    assert memory_failure(ValueError("x")) is None and stopped_here(RunDir(tiny_run), ValueError("x")) is None

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    last = max(RunDir(run).checkpoints(), key=lambda c: int(c.name.split("-")[1]))
    assert is_complete(last)
    (run / "checkpoint-99").mkdir()  # the one being written when memory ran out
    (run / "checkpoint-99" / "adapter_model.safetensors").write_bytes(b"half")
    message = stopped_here(RunDir(run), caught.value)
    assert not (run / "checkpoint-99").exists() and is_complete(last)
    # the run trained with gradient checkpointing off (auto: the tiny model's activations fit): switch it on
    assert message == (f"out of memory (an allocation of 1125899.91 GB failed). Training stopped: the last complete "
                       f"checkpoint is {last.name}; resume with less memory: medlora train --resume {run} "
                       "--gradient_checkpointing on")


def test_memory_running_out_mid_training_stops_with_one_line_and_the_resume_it_names_finishes(
        sample_csv, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """End to end: at the 5th optimizer step of a 6-step run (checkpoints every 2), a real allocation failure from
    torch's CPU allocator (a tensor no machine can hold, asked for inside the loss), as a training step would meet
    it. One line naming the last complete checkpoint and the resume command with less memory; nothing newer is
    left; that command, run as printed, finishes the run."""
    import json

    import torch

    import medlora.training.trainer as trainer_module

    real_loss, calls = trainer_module.answer_only_loss, []

    def loss_that_runs_out(model, inputs, num_items_in_batch=None):
        if model.training:
            calls.append(1)
            if len(calls) == 5:
                torch.empty(2**50, dtype=torch.uint8)  # 1,126 TB: torch's own "can't allocate memory" error
        return real_loss(model, inputs, num_items_in_batch)

    monkeypatch.setattr(trainer_module, "answer_only_loss", loss_that_runs_out)
    out = tmp_path / "run"
    code = main(["train", "--data", str(sample_csv), "--model", str(tiny_model_dir), "--output_dir", str(out),
                 "--max_steps", "6", "--gradient_accumulation_steps", "1", "--save_steps", "2",
                 "--max_eval_samples", "2"])
    lines = message_lines(capsys.readouterr().err)
    resume = f"medlora train --resume {out} --gradient_checkpointing on"
    assert code == 2 and lines[-1] == ("medlora: error: out of memory (an allocation of 1125899.91 GB failed). "
                                       f"Training stopped: the last complete checkpoint is checkpoint-4; resume "
                                       f"with less memory: {resume}")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(trainer_module, "answer_only_loss", real_loss)
    assert main(resume.split()[1:]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 6 and metrics["resumed_from"] == "checkpoint-4"
    assert json.loads((out / "run_info.json").read_text())["gradient_checkpointing"] is True


def test_a_loss_curve_that_cannot_be_drawn_is_a_warning(tmp_path, capsys):
    """The picture comes last, after hours of training: failing to draw it (here: its folder is gone) must not fail
    the run, and leaves no temporary file."""
    from medlora.training.plots import plot_loss_curve

    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}]
    plot_loss_curve(history, tmp_path / "gone" / "loss_curve.png")
    assert "warning: could not draw loss_curve.png (" in capsys.readouterr().err
    plot_loss_curve(history, tmp_path / "loss_curve.png")
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG" and len(list(tmp_path.iterdir())) == 1


def test_a_resume_under_nproc_is_checked_against_the_runs_own_accumulation(tiny_run, tmp_path, capsys):
    """gradient_accumulation_steps cannot change on resume, so --nproc must divide the run's own (not the default
    16): a run made with 4 resumes in 2 or 4 processes, one made with 1 is refused in one line before any worker
    starts, naming the process counts that can continue it."""
    import shutil

    from medlora.cli import build_parser, parse_args
    from medlora.training.inputs import resume_config

    run = tmp_path / "ga4"
    shutil.copytree(tiny_run, run)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("gradient_accumulation_steps: 1", "gradient_accumulation_steps: 4"))
    for n in (2, 4):
        cfg = resume_config(parse_args(build_parser(), ["train", "--resume", str(run), "--nproc", str(n)]))
        assert cfg.nproc == n and cfg.gradient_accumulation_steps == 4
    assert main(["train", "--resume", str(run), "--nproc", "3"]) == 2
    err = capsys.readouterr().err
    assert message_lines(err) == ["medlora: error: --resume --nproc 3: this run accumulates 4 samples per optimizer "
                                  "step (gradient_accumulation_steps 4, which a resume keeps), and each process takes "
                                  "an equal share; --nproc 2, 4 or 1 can continue it"], err
    assert main(["train", "--resume", str(tiny_run), "--nproc", "2"]) == 2
    assert "only one process can continue it (drop --nproc)" in capsys.readouterr().err
    assert "training in" not in err


def test_leftover_torchrun_variables_are_one_line(tmp_path, monkeypatch, capsys):
    """WORLD_SIZE and LOCAL_RANK exported by hand or left from another job, without the rest of torchrun's set:
    torch and transformers would fail with a traceback, or wait for peers that never come."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    csv_file = tmp_path / "qa.csv"
    csv_file.write_text("qtype,Question,Answer\ninformation,What is it?,A thing.\n")
    assert main(["train", "--data", str(csv_file), "--nproc", "2", "--output_dir", str(tmp_path / "run")]) == 2
    assert message_lines(capsys.readouterr().err) == [
        "medlora: error: the environment sets LOCAL_RANK, WORLD_SIZE but not RANK, MASTER_ADDR, MASTER_PORT: "
        "torchrun's variables, left over from another job? Unset them (`unset LOCAL_RANK WORLD_SIZE`), or start the "
        "job with torchrun"]
    assert not (tmp_path / "run").exists()


def test_a_run_folder_lock_held_on_another_machine_is_never_taken_over(tmp_path):
    """A run folder on a shared filesystem: the lock names its host, because a process on another machine cannot be
    checked from here (its pid means nothing on this one). Such a lock is respected, and the message says how to
    clear it if that machine went down; a dead process's lock on this machine is taken over as before."""
    from medlora.errors import MedloraError
    from medlora.rundir import HOST, LOCK, RunDir

    run = RunDir(tmp_path)
    lock = tmp_path / LOCK
    lock.write_text("4242 gpu-node-7")
    with pytest.raises(MedloraError) as e:
        run.lock_or_fail()
    assert str(e.value) == (f"{tmp_path}: a medlora process on gpu-node-7 (pid 4242) is training in this folder; "
                            f"wait for it or stop it first (if that machine went down, delete {lock})")
    assert run.is_locked()
    lock.write_text(f"1 {HOST}")  # init: alive on this machine
    with pytest.raises(MedloraError, match=r"another medlora process is training in this folder \(pid 1\)"):
        run.lock_or_fail()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for stale in (f"{dead.pid} {HOST}", str(dead.pid)):  # a lock written before hosts were: this machine's
        lock.write_text(stale)
        assert not run.is_locked()
        run.lock_or_fail()
        assert lock.read_text() == f"{os.getpid()} {HOST}"
        run.unlock()
        assert not lock.exists()


def test_resuming_a_run_that_is_training_is_refused_before_any_worker_starts(tiny_run, tmp_path, capsys):
    from medlora.rundir import LOCK

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / LOCK).write_text("4242 gpu-node-7")
    assert main(["train", "--resume", str(run), "--max_steps", "4", "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert message_lines(err) == [f"medlora: error: {run}: a medlora process on gpu-node-7 (pid 4242) is training in "
                                  f"this folder; wait for it or stop it first (if that machine went down, delete "
                                  f"{run / LOCK})"], err
    assert "training in 2 processes" not in err
