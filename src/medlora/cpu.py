"""What this CPU can do, and the speed plan a training run follows on it.

medlora never assumes a CPU class: native bf16 (AVX512-BF16 or AMX) is read from the CPU flags, and
gradient checkpointing is chosen from the RAM that is free once the model is loaded.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import log


# The tokenizers library: medlora's processes run with TOKENIZERS_PARALLELISM=false unless the user set it, so that
# a process forked later (DataLoader workers) neither warns nor risks a deadlock; the library reads the variable on
# every call, so the big batch calls (tokenising a whole CSV) switch it on around themselves and use every core
# (`medlora data check` on MedQuAD: 37 s -> 28 s on a 2-core Zen 3). The marker says the "false" is medlora's
# default, not the user's choice.
_OUR_TOKENIZERS_DEFAULT = "MEDLORA_TOKENIZERS_DEFAULT"


def quiet_tokenizers_after_fork() -> None:
    if "TOKENIZERS_PARALLELISM" not in os.environ:
        os.environ.update({"TOKENIZERS_PARALLELISM": "false", _OUR_TOKENIZERS_DEFAULT: "1"})


@contextmanager
def tokenizing_on_every_core():
    if os.environ.get(_OUR_TOKENIZERS_DEFAULT) != "1" or os.environ.get("TOKENIZERS_PARALLELISM") != "false":
        yield  # the user's setting
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def cpu_flags() -> set[str]:
    """The flags line of /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a container's cpuset), not the machine's
    count, so a process pinned to some cores does not start a thread for every core and fight itself."""
    cpus = _affinity()
    return len(cpus) if cpus is not None else os.cpu_count() or 1


def busy_elsewhere(window: float = 0.25) -> float:
    """How many of this process's CPUs other processes keep busy right now: the busy time /proc/stat counts on
    them over ``window`` seconds, less this process's own. The 1-minute load average answers too late: right
    after a training run it still counts the two cores the run has just released, for a minute or more.
    Elsewhere (no /proc/stat) the 1-minute load average."""
    cpus = _affinity()
    try:
        before, own_before = _busy_ticks(cpus), os.times()
        time.sleep(window)
        after, own_after = _busy_ticks(cpus), os.times()
    except (OSError, ValueError):
        try:
            return float(os.getloadavg()[0])
        except (AttributeError, OSError):
            return 0.0
    own = (own_after.user + own_after.system) - (own_before.user + own_before.system)
    return max(0.0, ((after - before) / os.sysconf("SC_CLK_TCK") - own) / window)


def _affinity() -> set[int] | None:
    """This process's CPUs (its affinity mask), or None where the OS does not say (not Linux)."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:
        return None


def _busy_ticks(cpus: set[int] | None) -> int:
    """Non-idle ticks (user, nice, system, irq, softirq, steal; not idle or iowait) of the given CPUs (all if None)."""
    total = counted = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
        total, counted = total + user + nice + system + irq + softirq + steal, counted + 1
    if not counted:
        raise ValueError("none of this process's CPUs in /proc/stat")
    return total


def cpu_has_native_bf16() -> bool:
    """True where bf16 matmuls run natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_summary() -> dict:
    """The CPU model and the vector flags that decide medlora's speed, for run_info.json and benchmarks."""
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    flags = cpu_flags()
    watched = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return {"model": model, "flags": [f for f in watched if f in flags]}


@dataclass(frozen=True)
class SpeedPlan:
    """How one training run uses this CPU; saved in run_info.json with the reasons."""

    precision: str                    # "fp32", "bf16" (frozen base weights in bf16 + autocast) or "int8"
    gradient_checkpointing: bool      # (int8: frozen base linears in int8, training/int8.py; activations fp32)
    gradient_checkpointing_why: str
    answer_only_lm_head: bool         # the LM head runs on answer positions only (see training/losses.py)
    precision_why: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_precision(requested: str) -> str:
    """'bf16', 'fp32' or 'int8' for this run. auto: bf16 only where the CPU multiplies bf16 natively, else the
    specification's fp32; int8 (frozen base weights in int8, training/int8.py) only when asked for: it is faster
    and lighter and met issue 14's quality criterion on MedQuAD (eval loss within 0.4% of fp32's, its adapter on
    the fp32 base within 0.3%; criterion 1%; benchmarks/results/int8_quality.md), but it quantises the base
    model, a trade the user makes knowingly."""
    if requested == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if requested == "bf16" and not cpu_has_native_bf16():
        log("warning: this CPU has no native bf16 (avx512_bf16/amx_bf16); bf16 is emulated and many times "
            "slower than fp32 here")
    return requested


def int8_hint(requested: str, resolved: str) -> str | None:
    """The training log's line naming ``--precision int8`` where ``auto`` chose a precision that int8 beat in
    the training benchmark on this CPU class (the 1.5B architecture; README: int8 frozen base weights), else
    None. Not on CPUs with AMX: there bf16 was the faster (Xeon, before int8's bf16 LM head; not measured since)."""
    if requested != "auto":
        return None
    quality = "with an eval loss within 0.4% of fp32's (README: int8 frozen base weights)"
    if resolved == "fp32":
        return ("--precision int8 trained the 1.5B model 1.7x faster than fp32 in half the memory on a Zen 3 "
                f"without native bf16, {quality}")
    if resolved == "bf16" and not cpu_flags() & {"amx_bf16", "amx_int8"}:
        return ("--precision int8 trained the 1.5B model 1.25x faster than bf16 in 16% less memory on a Zen 4 "
                "with native bf16, as fast in 18% less on a Zen 5 (the bundled 135M model: as fast as bf16), "
                f"{quality}")
    return None


def precision_reason(requested: str, resolved: str) -> str:
    """Why this run trains in ``resolved`` precision, for run_info.json."""
    flags = cpu_flags()
    if requested != "auto":
        return f"--precision {requested}"
    if resolved == "bf16":
        return "auto: this CPU has native bf16 (avx512_bf16/amx_bf16)"
    vnni = ", ".join(f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags) or "no VNNI/AMX"
    return ("auto: no native bf16 on this CPU, so the specification's fp32; --precision int8 (int8 frozen base "
            f"weights, int8 kernels: {vnni}) is opt-in: faster and about half the memory, with an eval loss within "
            "0.4% of fp32's on MedQuAD (README: int8)")


# Values kept for the backward pass per token and decoder layer without gradient checkpointing, in units of
# the activation element size: roughly the saved inputs of the 7 LoRA projections and their dropout copies,
# norms, attention and the MLP's intermediate tensors. Sized to over-estimate what was measured (Qwen2.5-1.5B
# architecture, fp32, 512 tokens: 7.4 GB above the weights, estimate 8.5 GB), so "auto" errs towards on.
ACT_PER_HIDDEN, ACT_PER_INTERMEDIATE = 34, 9
CHECKPOINTING_HEADROOM = 0.75  # use at most this share of the RAM that is free after the model is loaded


def activation_bytes(model_config, seq_len: int, batch: int, precision: str) -> int:
    """Estimated activation memory of one micro-batch of seq_len tokens, without gradient checkpointing."""
    hidden = model_config.hidden_size
    intermediate = getattr(model_config, "intermediate_size", 4 * hidden)
    per_token_layer = ACT_PER_HIDDEN * hidden + ACT_PER_INTERMEDIATE * intermediate
    vocab_logits = 3 * model_config.vocab_size * 4  # a few fp32 rows of logits per answer token (loss + grad)
    elem = 2 if precision == "bf16" else 4
    return batch * seq_len * (model_config.num_hidden_layers * per_token_layer * elem + vocab_logits)


def resolve_checkpointing(requested: str, model_config, seq_len: int, batch: int,
                          precision: str) -> tuple[bool, str]:
    """(use gradient checkpointing?, why). 'auto' turns it off when the longest micro-batch fits in free RAM."""
    if requested != "auto":
        return requested == "on", f"--gradient_checkpointing {requested}"
    import psutil

    need = activation_bytes(model_config, seq_len, batch, precision)
    free = psutil.virtual_memory().available
    on = need > CHECKPOINTING_HEADROOM * free
    return on, f"auto: activations need ~{need / 1e9:.1f} GB at {seq_len} tokens, {free / 1e9:.1f} GB of RAM free"
