"""The `medlora` command: a table of subcommands (COMMANDS), each an argument builder and a runner.

Arguments are parsed with ``parse_known_args`` so the ``-f kernel.json`` that Jupyter appends is
ignored; any other unknown option is still an error (a typo must not silently train with a default).
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import random
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

from .config import DEFAULT_MODEL, add_config_arguments, build_config
from .cpu import quiet_tokenizers_after_fork
from .errors import Interrupted, MedloraError, memory_failure, write_failure
from .rundir import CHECKPOINT_PREFIX, EXPORT, MERGED, MODELFILE

quiet_tokenizers_after_fork()
# Deprecation chatter from transformers/peft internals is noise to our users, not something they can act on.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*is deprecated.*")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``medlora: error:`` line (not 25 lines of usage), and flags are never
    abbreviated: a prefix such as --learn is an unknown flag with a suggestion, not a guess."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise MedloraError(message.replace("\n", " "))


def _strip_jupyter_args(unknown: list[str]) -> list[str]:
    """Drop Jupyter's kernel-connection argument (-f FILE, --f=FILE); return what is left."""
    rest, skip = [], False
    for i, arg in enumerate(unknown):
        if skip:
            skip = False
            continue
        if arg in ("-f", "--f"):
            skip = i + 1 < len(unknown)
            continue
        if arg.startswith(("-f=", "--f=")) or (arg.endswith(".json") and "kernel" in os.path.basename(arg)):
            continue
        rest.append(arg)
    return rest


TORCHRUN_OPTIONS = {"__nnodes", "__nproc_per_node", "__node_rank", "__rdzv_endpoint", "__rdzv_backend", "__rdzv_id",
                    "__master_addr", "__master_port", "__standalone", "__max_restarts"}


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    args, unknown = parser.parse_known_args(argv)
    rest = _strip_jupyter_args(unknown)
    if rest:
        chosen = getattr(args, "parser", parser)  # the subcommand's own flags make the best suggestions
        known = [s for a in chosen._actions for s in a.option_strings]
        first = rest[0].split("=")[0]
        if first.replace("-", "_") in TORCHRUN_OPTIONS:
            raise MedloraError(f"{first} is an option of torchrun, not of medlora: `medlora train --nproc N` trains "
                               "in N processes on this machine; for several machines start `torchrun --nnodes M "
                               "--nproc_per_node N ... -m medlora train ...` on each (README: several machines)")
        close = difflib.get_close_matches(first, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise MedloraError(f"unknown argument {rest[0]}{hint}")
    return args


# ---------------------------------------------------------------- train

def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest complete checkpoint, with its saved configuration")
    add_config_arguments(p)


def cmd_train(args) -> int:
    from .training.inputs import check_new_run_inputs, resume_config, with_default_data
    from .training.launcher import check_environment  # torch alone: no transformers in the launcher

    check_environment()
    cfg = resume_config(args) if args.resume else with_default_data(build_config(args))
    if not args.resume:
        check_new_run_inputs(cfg)
    if args.from_command_line and cfg.precision == "int8":  # int8 runs go on, on jemalloc where the system has it
        from .allocator import reexecute_on_jemalloc

        reexecute_on_jemalloc(args.argv)
    from .training.launcher import in_worker, launch  # torch alone: no transformers in the launcher

    if cfg.nproc > 1 and not in_worker():  # this process launches the workers (torchrun's agent)
        return launch(cfg.nproc, cfg.num_threads, args.argv, args.resume)
    from .training.recipe import run

    if args.from_command_line:  # a process of its own, for this one run
        from .allocator import freeze_loaded_objects

        freeze_loaded_objects()
    run(cfg, resume=args.resume)
    return 0


# ---------------------------------------------------------------- data check

def data_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer counts tokens (default: %(default)s)")
    p.add_argument("--max_seq_len", "--max-seq-len", type=int, default=512)
    p.add_argument("--system_prompt", "--system-prompt", default=None)
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")


def cmd_data_check(args) -> int:
    from .data import check_file, check_text
    from .model import load_tokenizer, resolve_model
    from .prompts import DEFAULT_SYSTEM_PROMPT

    if args.max_seq_len < 16:
        raise MedloraError("max_seq_len must be >= 16")
    stats = check_file(args.file, lambda: load_tokenizer(resolve_model(args.model)), args.model, args.max_seq_len,
                       args.system_prompt or DEFAULT_SYSTEM_PROMPT)
    print(json.dumps(stats, indent=2) if args.json else check_text(stats))
    return 0


# ---------------------------------------------------------------- chat

def chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", help=f"run folder, one of its {CHECKPOINT_PREFIX}N/ (the run at step N), "
                                              f"its {MERGED}/ or any HF model folder")
    p.add_argument("--model", help="base model (alone: chat with the base model; with RUN_DIR: override its base)")
    p.add_argument("--question", "-q", help="ask one question, print the answer and exit")
    p.add_argument("--mode", choices=("greedy", "sample"),
                   help="greedy (the default) or sample (the default once --temperature or --top_p is given)")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top_p", "--top-p", type=float)
    p.add_argument("--repetition_penalty", "--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling mode (reproducible answers)")
    p.add_argument("--system_prompt", "--system-prompt", default=None)
    p.add_argument("--trust_remote_code", action="store_true")
    backend_arguments(p)
    safety_arguments(p)


def backend_arguments(p: argparse.ArgumentParser) -> None:
    from .inference.loader import BACKENDS

    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default): llama.cpp on the run's GGUF (exported and cached on first use) where it "
                        "loads, else transformers; hf: transformers, fp32; llamacpp: llama.cpp or an error")
    p.add_argument("--threads", type=int, metavar="N",
                   help="llama.cpp threads (default: the cores not busy with other work)")


def safety_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no_safety_guard", "--no-safety-guard", action="store_true",
                   help="do not put the emergency notice above answers to red-flag questions (on by default)")
    p.add_argument("--emergency_number", "--emergency-number", metavar="NUMBER",
                   help="the emergency number the notice names (default: examples 911 / 112 / 999)")


def check_emergency_number(args) -> None:
    if args.emergency_number is not None and not args.emergency_number.strip():
        raise MedloraError("--emergency_number is empty")


def guarded(backend, args):
    from .inference.guard import GuardedBackend

    return GuardedBackend(backend, enabled=not args.no_safety_guard, emergency_number=args.emergency_number)


def cmd_chat(args) -> int:
    from .chat import ask, repl
    from .inference.backend import preset
    from .inference.loader import open_backend

    if args.run_dir is None and args.model is None:
        raise MedloraError("give a run folder (medlora chat runs/NAME) or --model NAME for the base model")
    if args.question is not None and not args.question.strip():
        raise MedloraError("--question is empty")
    check_emergency_number(args)
    sampling_knobs = [f"--{k}" for k in ("temperature", "top_p") if getattr(args, k) is not None]
    if args.mode == "greedy" and sampling_knobs:
        raise MedloraError(f"{' and '.join(sampling_knobs)} shape sampling, and --mode greedy does not sample: drop "
                           "one or the other")
    args.mode = args.mode or ("sample" if sampling_knobs else "greedy")  # as serve: a temperature means sampling
    seed = args.seed
    if args.mode == "sample" and seed is None:  # a fresh seed, shown so the answer can be reproduced
        seed = random.SystemRandom().randrange(2**31)
    params = preset(args.mode, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, seed=seed)
    backend = guarded(open_backend(args.run_dir, args.model, args.backend, args.threads, args.trust_remote_code), args)
    mode = f"{args.mode}, seed {seed}" if args.mode == "sample" else args.mode
    mode += ", safety guard off" if args.no_safety_guard else ""
    if args.question is not None:
        print(f"[{backend.description}, {mode}]", file=sys.stderr)
        ask(backend, args.question, params, args.system_prompt)
        return 0
    print(f"[{mode}]", file=sys.stderr)
    repl(backend, params, args.system_prompt)
    return 0


# ---------------------------------------------------------------- eval

def eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help=f"run folder written by medlora train, or one of its {CHECKPOINT_PREFIX}N/")
    p.add_argument("--data", help="evaluate on this CSV (same columns) instead of the run's own split")
    p.add_argument("--samples", type=int, default=20,
                   help="rows per split to answer for ROUGE-L and the side-by-side (default: %(default)s; 0: none)")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, help="answer length cap (default: 256)")
    p.add_argument("--max_eval_samples", "--max-eval-samples", type=int,
                   help="eval rows for loss/perplexity (default: the run's setting; 0: all)")
    p.add_argument("--show", type=int, default=5, help="side-by-side answers in the report (default: %(default)s)")
    p.add_argument("--model", help="base model to put the adapter on (default: the run's)")
    p.add_argument("--safety", action="store_true",
                   help="also answer bundled red-flag questions and report how often each model tells the person to "
                        "get emergency help, and how the emergency guard does")
    p.add_argument("--recompute_loss", "--recompute-loss", action="store_true",
                   help="measure the eval loss again (by default it is taken from the run's metrics where training "
                        "measured it on the same rows in fp32)")
    p.add_argument("--no_forgetting", "--no-forgetting", action="store_true",
                   help="skip the forgetting check (loss on general instructions, base vs fine-tuned)")
    p.add_argument("--forgetting_samples", "--forgetting-samples", type=int, metavar="N",
                   help="general instructions for the forgetting check (default: all 50 bundled ones)")
    p.add_argument("--safety_samples", "--safety-samples", type=int, default=40,
                   help="red-flag questions to answer with --safety (default: %(default)s, spread over categories)")
    backend_arguments(p)
    safety_arguments(p)


def cmd_eval(args) -> int:
    from .rundir import RunDir

    check_emergency_number(args)
    RunDir.open(args.run_dir)  # a wrong folder fails at once, before torch and transformers load (evaluate_run
    # checks it again for its other callers)
    from .evals.compare import evaluate_run
    from .evals.report import REPORT_HTML

    out = evaluate_run(args.run_dir, data=args.data, samples=args.samples, max_new_tokens=args.max_new_tokens,
                       max_eval_samples=args.max_eval_samples, show=args.show, model=args.model,
                       safety_guard=not args.no_safety_guard, emergency_number=args.emergency_number,
                       safety=args.safety, safety_samples=args.safety_samples, forgetting=not args.no_forgetting,
                       backend=args.backend, threads=args.threads, forgetting_samples=args.forgetting_samples,
                       recompute_loss=args.recompute_loss)
    print(out / REPORT_HTML)
    return 0


# ---------------------------------------------------------------- merge

def merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help=f"run folder, or one of its {CHECKPOINT_PREFIX}N/ (writes "
                                   f"{MERGED}-{CHECKPOINT_PREFIX}N/)")
    p.add_argument("--trust_remote_code", action="store_true")


def cmd_merge(args) -> int:
    from .export.merge import merge_run
    from .rundir import RunDir

    print(merge_run(RunDir.open(args.run_dir), trust_remote_code=args.trust_remote_code))
    return 0


# ---------------------------------------------------------------- export

def export_arguments(p: argparse.ArgumentParser) -> None:
    from .export.gguf import DEFAULT_QUANT, QUANTS

    p.add_argument("run_dir", help=f"run folder (its adapter is merged in memory), one of its {CHECKPOINT_PREFIX}N/, "
                                   "its merged model, or an HF model folder (llama or qwen2)")
    p.add_argument("--quant", choices=QUANTS, default=DEFAULT_QUANT,
                   help="weight format: f16, q8_0 (default) or q4_0 (calibrated on 8 of the run's training rows, its "
                        "most sensitive tensors kept q8_0); norms and biases stay f32")
    p.add_argument("--output", metavar="FILE",
                   help=f"the .gguf to write (default: RUN_DIR/{EXPORT}/NAME-QUANT.gguf); a {MODELFILE} "
                        "for Ollama is written beside it")
    p.add_argument("--trust_remote_code", action="store_true")


def cmd_export(args) -> int:
    from .export.exporter import export

    print(export(args.run_dir, quant=args.quant, output=args.output, trust_remote_code=args.trust_remote_code))
    return 0


# ---------------------------------------------------------------- serve

def serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", help=f"run folder, one of its {CHECKPOINT_PREFIX}N/, its {MERGED}/, an HF "
                                              "model folder or a .gguf file")
    p.add_argument("--model", help="base model (alone: serve the base model; with RUN_DIR: override its base)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; another than loopback needs --api_key or "
                        "--insecure)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0: any free port)")
    p.add_argument("--api_key", "--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page "
                        "(default: $MEDLORA_API_KEY)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--served_model_name", "--served-model-name", metavar="NAME",
                   help="the model name /v1/models lists (default: the run folder's name or --model)")
    p.add_argument("--mode", choices=("greedy", "sample"), default="greedy",
                   help="decoding for requests that send no temperature (default: %(default)s)")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=256,
                   help="answer length for requests that send no max_tokens (default: %(default)s)")
    p.add_argument("--max_tokens_limit", "--max-tokens-limit", type=int, default=1024,
                   help="the largest max_tokens a request may ask for (default: %(default)s)")
    p.add_argument("--max_queue", "--max-queue", type=int, default=8,
                   help="requests that may wait while one is answered; more get 429 (default: %(default)s)")
    p.add_argument("--max_request_bytes", "--max-request-bytes", type=int, default=1_000_000,
                   help="largest request body (default: %(default)s)")
    p.add_argument("--system_prompt", "--system-prompt", default=None,
                   help="system prompt for requests without one (default: the run's training prompt)")
    p.add_argument("--emergency_number", "--emergency-number", metavar="NUMBER",
                   help="the emergency number the safety guard's notice names (default: examples 911 / 112 / 999)")
    p.add_argument("--trust_remote_code", action="store_true")
    backend_arguments(p)


def cmd_serve(args) -> int:
    from .serve.server import run

    return run(args)


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Command:
    name: str                                            # "train", or "data check" for a nested command
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS = (
    Command("train", "fine-tune a model with LoRA on a qtype/Question/Answer CSV", train_arguments, cmd_train),
    Command("data check", "validate a CSV and print statistics, without training", data_check_arguments,
            cmd_data_check),
    Command("chat", "talk to a fine-tuned run, a merged model, or a base model", chat_arguments, cmd_chat),
    Command("eval", "compare a run with its base model: eval loss, ROUGE-L, answers side by side", eval_arguments,
            cmd_eval),
    Command("merge", f"write RUN_DIR/{MERGED}/ (base weights with the LoRA folded in)", merge_arguments, cmd_merge),
    Command("export", f"write RUN_DIR/{EXPORT}/NAME-QUANT.gguf for llama.cpp and Ollama (and a {MODELFILE})",
            export_arguments, cmd_export),
    Command("serve", "an OpenAI-compatible API and a chat page for a run, a merged model, a GGUF or a base model",
            serve_arguments, cmd_serve),
)
GROUPS = {"data": "inspect a dataset"}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="medlora", description="CPU LoRA fine-tuning for medical Q&A")
    parser.add_argument("--version", action="version", version=f"medlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in COMMANDS:
        group, _, name = command.name.rpartition(" ")
        if group and group not in groups:
            groups[group] = sub.add_parser(group, help=GROUPS[group]).add_subparsers(
                dest=f"{group}_command", metavar="SUBCOMMAND")
        p = (groups[group] if group else sub).add_parser(name, help=command.help)
        command.arguments(p)
        p.set_defaults(handler=command.run, parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_args(parser, argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc N` hands them to its workers
        args.from_command_line = argv is None
        handler = getattr(args, "handler", None)
        if handler is None:  # `medlora` or `medlora data` alone: what can follow
            group = getattr(args, "command", None)
            (parser if group is None else parser._subparsers._group_actions[0].choices[group]).print_help()
            return 2
        return leave(handler(args), argv)
    except Interrupted as e:
        print(f"medlora: {e}", file=sys.stderr)
        return leave(e.code, argv)
    except MedloraError as e:
        say_error(f"medlora: error: {e}")
        return leave(2, argv)
    except KeyboardInterrupt:
        print("\nmedlora: interrupted", file=sys.stderr)
        return leave(130, argv)
    except Exception as e:  # a full disk (or a quota, a read-only disk), or no memory left: one line, no traceback
        if reason := write_failure(e):
            where = f" {e.filename}" if isinstance(e, OSError) and e.filename else ""
            say_error(f"medlora: error: cannot write{where}: {reason}")
        elif reason := memory_failure(e):
            say_error(f"medlora: error: out of memory ({reason}); close other programs, or use a smaller model")
        elif isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:  # any path a user gives, wherever it is used
            name = str(e.filename or "")
            shown = f"{name[:60]}...{name[-20:]}" if len(name) > 90 else name
            say_error(f"medlora: error: {shown}: file name too long")
        else:
            raise
        return leave(2, argv)


def leave(code: int, argv: list[str] | None) -> int:
    """``code``; a worker of a distributed run started from the command line exits here instead (why: in
    training/launcher.py, worker_exit)."""
    from .training.launcher import worker_exit  # loads no torch

    return worker_exit(code, from_command_line=argv is None)


def say_error(line: str) -> None:
    """The one error line, on stderr; from a worker of `medlora train --nproc`, to the launcher instead, which prints
    it once for the job (training/launcher.py): torchrun shows rank 0's output only, and stops the other workers
    as soon as one fails, so rank 0 may be stopped before it could say why, or be the one without an error."""
    from .training.launcher import tell_launcher  # loads no torch

    if not tell_launcher(line):
        print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
