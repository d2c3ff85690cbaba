"""int8 training quality on MedQuAD (issue 14's criterion 2): fp32 and `--precision int8` runs of the bundled
SmolLM2-135M on the same rows for the same steps; the int8 run's eval loss against the fp32 run's, and each run's
adapter on the unquantised fp32 base, measured by the same fp32 code (as tests/test_int8.py does on the bundled
sample). Also the untrained models' eval losses (the int8 forward pass alone).

    python -m benchmarks.int8_quality                        # this CPU's int8 (7-bit weights without VNNI/AMX)
    python -m benchmarks.int8_quality --weight_bits 7        # the no-VNNI configuration on any CPU
    python -m benchmarks.int8_quality --rotation_block 1     # without the Hadamard rotation (to measure it)

The int8 kernel computes the quantised product exactly (tests/test_int8.py), so the numbers depend on the
weight bits and the rotation, not on the CPU. Writes int8_quality.md/.json to --out_dir."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

MEDQUAD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medquad.csv"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(MEDQUAD))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eval_rows", type=int, default=8)
    p.add_argument("--weight_bits", type=int, choices=(7, 8), help="default: what this CPU uses")
    p.add_argument("--rotation_block", type=int, help="largest Hadamard block (1: no rotation; default: medlora's)")
    p.add_argument("--out_dir", default="benchmarks/results")
    p.add_argument("--workdir", default="/tmp/medlora_int8_quality")
    args = p.parse_args(argv)
    if not Path(args.data).is_file():
        sys.exit(f"{args.data} not found (MedQuAD: see ../shared/data/README)")

    import torch

    import medlora.training.int8 as int8
    from medlora.cli import main as medlora
    from medlora.config import TrainConfig
    from medlora.cpu import cpu_summary
    from medlora.data import load_qa_csv, split
    from medlora.evals.compare import answer_losses
    from medlora.model import load_run_model
    from medlora.rundir import RunDir

    if args.weight_bits:
        int8.int8_without_saturation = lambda: args.weight_bits == 8
    if args.rotation_block:
        int8._ROTATION = args.rotation_block
    bits = 8 if int8.int8_without_saturation() else 7
    train = ["--data", args.data, "--model", "smollm2-135m", "--max_steps", str(args.steps),
             "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--lora_dropout", "0",
             "--max_seq_len", "192", "--max_eval_samples", str(args.eval_rows), "--save_steps", "100000"]
    metrics, on_fp32_base, seconds = {}, {}, {}
    for precision in ("fp32", "int8"):
        out = Path(args.workdir) / precision
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        if medlora(["train", *train, "--output_dir", str(out), "--precision", precision]) != 0:
            sys.exit(f"the {precision} run failed")
        seconds[precision] = round(time.perf_counter() - t, 1)
        metrics[precision] = json.loads((out / "metrics.json").read_text())
        run = RunDir(out)
        model, tokenizer, _ = load_run_model(run)  # the saved adapter on the plain fp32 base
        cfg = TrainConfig(**{k: v for k, v in run.read_config_raw().items() if k in TrainConfig.__dataclass_fields__})
        _, evals = split(load_qa_csv(args.data)[0], cfg.test_size, cfg.seed)
        with torch.no_grad():
            losses = answer_losses(model, tokenizer, evals.head(cfg.max_eval_samples), cfg, "eval")
        on_fp32_base[precision] = sum(losses) / len(losses)

    def pct(a, b):
        return round(100 * (a / b - 1), 2)

    f32, i8 = metrics["fp32"], metrics["int8"]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.int8_quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_summary(),
        "int8_weight_bits": bits, "rotation_block_max": int8._ROTATION,
        "protocol": f"SmolLM2-135M, {args.steps} steps of one row at lr 1e-3, max_seq_len 192, LoRA dropout 0, "
                    f"{args.eval_rows} eval rows, same rows and order for both runs",
        "eval_loss": {"fp32": f32["eval_loss"], "int8": i8["eval_loss"], "int8_vs_fp32_pct": pct(i8["eval_loss"],
                                                                                                 f32["eval_loss"])},
        "untrained_eval_loss": {"fp32": f32["base_eval_loss"], "int8": i8["base_eval_loss"],
                                "int8_vs_fp32_pct": pct(i8["base_eval_loss"], f32["base_eval_loss"])},
        "adapter_on_fp32_base": {**on_fp32_base, "int8_vs_fp32_pct": pct(on_fp32_base["int8"], on_fp32_base["fp32"])},
        "train_seconds": seconds,
    }
    result["criterion_1pct"] = ("met" if abs(result["eval_loss"]["int8_vs_fp32_pct"]) <= 1
                                and result["adapter_on_fp32_base"]["int8_vs_fp32_pct"] <= 1 else "not met")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "int8_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# int8 training quality on MedQuAD\n", f"{result['date']} · `{result['command']}`\n",
             f"CPU: {result['cpu']['model']} (flags: {', '.join(result['cpu']['flags'])})\n",
             f"int8 weights: {bits} bits; Hadamard rotation blocks up to {int8._ROTATION} (1: none). "
             f"{result['protocol']}.\n",
             "| | fp32 | int8 | int8 vs fp32 |", "|---|---:|---:|---:|"]
    for key, name in (("eval_loss", "eval loss after training"), ("untrained_eval_loss", "eval loss untrained"),
                      ("adapter_on_fp32_base", "adapter on the fp32 base")):
        r = result[key]
        lines.append(f"| {name} | {r['fp32']:.4f} | {r['int8']:.4f} | {r['int8_vs_fp32_pct']:+.2f}% |")
    lines.append(f"\nIssue 14's criterion (within 1%): {result['criterion_1pct']}.")
    (out_dir / "int8_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
