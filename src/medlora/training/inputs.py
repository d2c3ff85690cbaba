"""What `medlora train` starts from, settled in about a second, before torch, transformers and peft load (about 9 s
on a 2-core CPU) and before --nproc starts its workers: a resumed run's saved configuration (checked against the
options given again), and a new run's data, output folder and model. Nothing here imports torch."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from ..config import RESUMABLE_CHANGES, TrainConfig, build_config, load_yaml, process_counts
from ..data import load_qa_csv
from ..errors import MedloraError, log
from ..files import check_output_location
from ..model import resolve_model
from ..rundir import RunDir


def resume_config(args):
    """The saved configuration of RUN_DIR; options given again must agree with it, except a larger
    --max_steps, which extends the run, and the options of RESUMABLE_CHANGES, which this session uses."""
    run = RunDir.open(args.resume, finished=False)
    if run.is_locked():  # still training: refused here, before --nproc starts workers only to be refused there
        run.lock_or_fail()
    saved = run.read_config()
    if saved.data and not Path(saved.data).is_file() and run.read_info().get("data"):
        saved = replace(saved, data=run.read_info()["data"])  # a relative path saved by release 0.1.0
    given = build_config(args, divides=False)  # the process count is checked against the run's own accumulation
    explicit = {f.name for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    explicit |= set(load_yaml(args.config)) if args.config else set()
    if getattr(args, "output_dir", None) is not None and Path(args.output_dir).resolve() != run.path.resolve():
        raise MedloraError(f"--resume continues the run in its own folder {run.path}; --output_dir "
                           f"{args.output_dir} cannot move it (drop --output_dir)")
    explicit.discard("output_dir")  # the run folder is RUN_DIR (a YAML file's output_dir, e.g. RUN/config.yaml's)
    explicit.discard("nproc")  # how many processes continue the run is this session's choice (default 1)
    runtime = {k: getattr(given, k) for k in RESUMABLE_CHANGES if k in explicit}
    explicit -= set(runtime)

    def same(key) -> bool:
        a, b = getattr(given, key), getattr(saved, key)
        if key == "data" and a and b:
            return Path(a).resolve() == Path(b).resolve()
        return a == b or (key == "max_steps" and a > max(b, 0))  # a larger --max_steps extends the run

    differ = [f"{k} (saved {getattr(saved, k)!r}, given {getattr(given, k)!r})" for k in sorted(explicit)
              if not same(k)]
    if differ:
        raise MedloraError("--resume: these options differ from the run's saved configuration: "
                           + "; ".join(differ) + ". Drop them, or start a new run")
    steps = saved.gradient_accumulation_steps
    if given.nproc > 1 and steps % given.nproc:
        fits = process_counts(steps)[1:]
        raise MedloraError(f"--resume --nproc {given.nproc}: this run accumulates {steps} samples per optimizer step "
                           f"(gradient_accumulation_steps {steps}, which a resume keeps), and each process takes an "
                           f"equal share; " + (f"--nproc {', '.join(map(str, fits))} or 1 can continue it" if fits else
                                               "only one process can continue it (drop --nproc)"))
    saved = replace(saved, nproc=given.nproc, **runtime)
    return replace(saved, max_steps=given.max_steps) if "max_steps" in explicit else saved


DEFAULT_DATA = "Medical_QA_Dataset.csv"  # the specification's dataset file, where --data is not given


def with_default_data(cfg):
    """A new run without --data trains on the specification's Medical_QA_Dataset.csv in the current folder."""
    if cfg.data is None and Path(DEFAULT_DATA).is_file():
        log(f"--data not given: using {DEFAULT_DATA} in this folder")
        return replace(cfg, data=DEFAULT_DATA)
    return cfg


def read_data(cfg) -> tuple:
    """load_qa_csv's result for cfg.data, or one line saying --data is missing."""
    if not cfg.data:
        raise MedloraError(f"--data is required (a CSV with columns qtype, Question, Answer; without it, medlora "
                           f"looks for {DEFAULT_DATA} in the current folder, and there is none)")
    return load_qa_csv(cfg.data)


def check_new_run_inputs(cfg) -> None:
    """A new run's data, output folder and model, checked in about a second: before torch, transformers and peft
    load (about 9 s on a 2-core CPU) and before --nproc starts its workers. The recipe's preflight checks them
    again (callers of medlora.training.recipe.run get the same errors); reading the CSV twice costs well under a
    second, and the bundled model is converted here, once, before any worker needs it."""
    read_data(cfg)
    check_output_location(Path(cfg.output_dir))
    resolve_model(cfg.model)
