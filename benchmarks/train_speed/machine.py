"""Machine facts (CPU flags from medlora.cpu), library versions, and the fp32/bf16 peak FLOP/s."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

# The vector/matrix flags the report shows: medlora.cpu's list (bf16 and VNNI decide medlora's precision)
# plus amx_tile, which earlier reports carried.
# avx_vnni (VNNI on 256-bit vectors, e.g. Alder Lake, Zen 5) and avx512_vnni decide whether int8 dot products
# accumulate without saturation (medlora.training.int8 uses full 8-bit weights there).
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
                  "amx_tile")


def cpu_identity() -> dict:
    """vendor_id, cpu family, model and cpu MHz of the first CPU in /proc/cpuinfo (its flags come from
    medlora.cpu.cpu_flags); empty where there is no /proc/cpuinfo."""
    wanted = ("vendor_id", "cpu family", "model", "cpu MHz")
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    info = {}
    for line in first.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in wanted:
            info[key.strip()] = value.strip()
    return info


def machine_info() -> dict:
    import psutil

    from medlora.cpu import cpu_flags, cpu_has_native_bf16, cpu_summary

    ci, flags = cpu_identity(), cpu_flags()
    return {
        "cpu_model": cpu_summary()["model"] or platform.processor() or "unknown",
        "cpu_vendor": ci.get("vendor_id"),
        "cpu_family": int(ci["cpu family"]) if ci.get("cpu family", "").isdigit() else None,
        "cpu_model_number": int(ci["model"]) if ci.get("model", "").isdigit() else None,
        "cpu_mhz": float(ci["cpu MHz"]) if "cpu MHz" in ci else None,
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "flags": {f: f in flags for f in REPORTED_FLAGS},
        "native_bf16": cpu_has_native_bf16(),
        "hypervisor": "hypervisor" in flags,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def versions() -> dict:
    import peft
    import torch
    import transformers

    import medlora

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        out["trl"] = None
    out["medlora"] = getattr(medlora, "__version__", None)
    return out


def microarchitecture(m: dict) -> tuple[str, int, str]:
    """(name, fp32 FLOPs per cycle per core, assumption) for the detected CPU."""
    fam, model, vendor, flags = m.get("cpu_family"), m.get("cpu_model_number"), m.get("cpu_vendor"), m["flags"]
    if vendor == "AuthenticAMD" and fam == 25:
        zen4 = model is not None and (0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF)
        if zen4:
            return ("Zen 4", 32, "Zen 4 executes AVX-512 as 2x256-bit: 2 FMA pipes x 8 fp32 lanes x 2 FLOPs per FMA "
                                 "= 32 fp32 FLOPs/cycle/core (the same as AVX2)")
        return ("Zen 3", 32, "Zen 3 AVX2+FMA: 2 FMA pipes x 8 fp32 lanes x 2 FLOPs per FMA = 32 fp32 FLOPs/cycle/core")
    if vendor == "AuthenticAMD" and fam == 26:
        return ("Zen 5", 64, "Zen 5 (server cores) with full 512-bit datapath: 2 FMA pipes x 16 fp32 lanes x 2 = 64 "
                             "FLOPs/cycle/core; desktop/mobile parts execute AVX-512 as 2x256-bit (32)")
    if vendor == "GenuineIntel" and flags.get("amx_bf16"):
        return ("Intel Xeon with AMX (Sapphire Rapids or newer)", 64,
                "2 AVX-512 FMA units: 2 x 16 fp32 lanes x 2 = 64 fp32 FLOPs/cycle/core; its AMX tiles multiply "
                "bf16 and int8 (not fp32) many times faster, which the measured bf16 peak shows")
    if flags.get("avx512f"):
        return ("AVX-512", 64, "AVX-512 with 2 FMA units: 2 x 16 fp32 lanes x 2 = 64 FLOPs/cycle/core "
                               "(parts with one 512-bit FMA unit reach half)")
    if flags.get("avx2") and flags.get("fma"):
        return ("AVX2+FMA", 32, "AVX2 with 2 FMA units: 2 x 8 fp32 lanes x 2 = 32 FLOPs/cycle/core")
    return ("SSE", 8, "no AVX2/FMA: assumed 8 fp32 FLOPs/cycle/core")


def theoretical_peak(m: dict) -> dict:
    name, per_cycle, assumption = microarchitecture(m)
    cores = m.get("physical_cores") or m.get("logical_cpus") or 1
    ghz = (m.get("cpu_mhz") or 0) / 1000
    peak = cores * ghz * 1e9 * per_cycle
    return {
        "microarchitecture": name,
        "flops_per_cycle_per_core": per_cycle,
        "cores": cores,
        "clock_ghz": round(ghz, 3),
        "gflops": round(peak / 1e9, 1),
        "formula": f"{cores} cores x {ghz:.3f} GHz x {per_cycle} fp32 FLOPs/cycle/core",
        "assumption": assumption + "; clock = 'cpu MHz' of /proc/cpuinfo (nominal clock under a hypervisor; "
                                   "boost clocks, if any, are not visible, so the real peak may be higher)",
    }


def empirical_peak(n: int = 4096, reps: int = 5, dtype: str = "float32") -> dict:
    """Best of `reps` torch.mm of n x n in `dtype`, all threads."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(n, n).to(getattr(torch, dtype)), torch.randn(n, n).to(getattr(torch, dtype))
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return {"gflops": round(2 * n**3 / best / 1e9, 1), "method": f"best of {reps} {dtype} torch.mm {n}x{n}, "
            f"{torch.get_num_threads()} threads (2*n^3 FLOPs)", "seconds": round(best, 3)}


def peaks(machine: dict) -> dict:
    """Theoretical and measured fp32 peaks, plus the measured bf16 one where the CPU has native bf16."""
    out = {"theoretical": theoretical_peak(machine), "empirical": empirical_peak()}
    if machine.get("native_bf16"):
        out["empirical_bf16"] = empirical_peak(dtype="bfloat16")  # for reading the bf16 contenders' numbers
    return out
