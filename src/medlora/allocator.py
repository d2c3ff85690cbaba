"""The memory allocator `medlora train --precision int8` runs on: jemalloc where the system has it, glibc's malloc
otherwise (and for the other precisions).

Why: a training step allocates and frees hundreds of activation-sized blocks (a few MB to ~100 MB each) in an
order glibc's heap fragments badly, and glibc keeps the freed holes resident. Measured on the Qwen2.5-1.5B
architecture, `--precision int8`, one 411-token step after a 227- and a 176-token one, 2-core AMD EPYC Zen 3:
glibc peaked at 5.56 GB and took 21.8 s; jemalloc configured as below 4.76 GB and 20.4 s. Returning freed
pages to the OS instead costs more time than it saves (every page is faulted in again on the next step: with
glibc set to mmap every block from 128 KB, 5.2 GB but 34 s per step), so jemalloc keeps its freed pages
(``dirty_decay_ms:-1,muzzy_decay_ms:-1``) and serves even the large blocks from its arenas
(``oversize_threshold:0``); :func:`release_freed_memory` hands back what the model build freed, once.

Only int8 runs: for fp32 the measurements point both ways (the 1.5B architecture ran 11.9 tokens/s on jemalloc
against 11.1 on glibc in another run, with a 0.4 GB higher peak; the bundled SmolLM2 demo trained at 77 tokens/s
against glibc's 81.5), and bf16 on it is unmeasured, so they keep the system's allocator.

How: an allocator replaces malloc only if it is loaded before the process starts, so `medlora train --precision
int8` started from the command line re-executes itself once with ``LD_PRELOAD`` and ``MALLOC_CONF`` set, as
PyTorch's CPU launcher (``python -m torch.backends.xeon.run_cpu --enable-jemalloc``) does. Debian and Ubuntu ship the library
as ``libjemalloc2`` (``make setup`` installs it where it can). ``MEDLORA_ALLOCATOR=system`` keeps glibc; a
``MALLOC_CONF`` of the user's own is kept as it is.

Also :func:`freeze_loaded_objects`: the loaded libraries kept out of the garbage collector's full collections.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

ENV = "MEDLORA_ALLOCATOR"  # "system": no re-execution
_REEXECUTED = "MEDLORA_ALLOCATOR_REEXECUTED"  # set in the re-executed process: never loop
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
_LIBRARY = "libjemalloc.so.2"
_SEARCH = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def jemalloc_path() -> str | None:
    """The system's jemalloc shared library (or one in this Python's prefix, as conda installs it), if any."""
    if not sys.platform.startswith("linux"):
        return None
    for folder in (*_SEARCH, str(Path(sys.prefix) / "lib"), str(Path(sys.base_prefix) / "lib")):
        path = Path(folder) / _LIBRARY
        if path.is_file():
            return str(path)
    import ctypes.util

    found = ctypes.util.find_library("jemalloc")  # elsewhere on the loader's path (ldconfig): a name ld.so finds
    return found if found == _LIBRARY else None


def active() -> str:
    """'jemalloc' when this process runs on it (its library is mapped), else 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "system"


def preloaded_env(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """``env`` (default: this process's) with jemalloc preloaded and configured, or None where that is off
    (``MEDLORA_ALLOCATOR=system``), already done, or impossible (no library)."""
    env = dict(os.environ if env is None else env)
    path = jemalloc_path()
    if env.get(ENV, "").lower() == "system" or env.get(_REEXECUTED) or path is None:
        return None
    if "libjemalloc" in env.get("LD_PRELOAD", ""):
        return None
    env["LD_PRELOAD"] = ":".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[_REEXECUTED] = "1"
    return env


def reexecute_on_jemalloc(argv: list[str]) -> None:
    """Replace this process by ``python -m medlora *argv`` on jemalloc (see the module docstring); returns only
    where that is off, already done or impossible. For the command-line entry only: an in-process caller of
    ``medlora.cli.main`` keeps its own process."""
    if active() == "jemalloc":
        return
    env = preloaded_env()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "medlora", *argv], env)
    except OSError:  # no exec here (a frozen app, a sandbox): carry on with glibc
        return


def release_freed_memory() -> None:
    """Hand memory freed so far back to the OS (once, after the model is built: quantising the base model frees
    its fp32 weights). jemalloc: purge every arena; glibc: malloc_trim, since glibc keeps freed blocks below its
    (adaptive, up to 32 MB) mmap threshold in the heap (measured on 4 Qwen2.5-1.5B-shaped layers, quantising
    freed only 136 MB of RSS without it and 346 MB with it)."""
    import gc

    gc.collect()
    try:
        process = ctypes.CDLL(None)
        if active() == "jemalloc":
            # MALLCTL_ARENAS_ALL is 4096: "arena.4096.purge" purges all arenas
            process.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
        else:
            process.malloc_trim(0)
    except (OSError, AttributeError):  # neither (macOS, musl): nothing to do
        pass


def describe() -> str:
    """For logs and run_info.json: which allocator runs, and why not jemalloc where it does not."""
    if active() == "jemalloc":
        return f"jemalloc (MALLOC_CONF={os.environ.get('MALLOC_CONF', '')})"
    if os.environ.get(ENV, "").lower() == "system":
        return f"system malloc ({ENV}=system)"
    if jemalloc_path() is None:
        return "system malloc (no libjemalloc.so.2 found)"
    return "system malloc"


def freeze_loaded_objects() -> None:
    """Move what is loaded so far (torch, transformers, peft: ~400,000 objects, none of them garbage) out of the
    garbage collector's sight (gc.freeze): a full collection, which medlora (release_freed_memory) and accelerate
    each run in a training run, then takes milliseconds instead of ~0.3 s. For a `medlora` process only: in a
    caller's own process (a notebook calling cli.main) it would also pin whatever that process has not freed yet."""
    import gc

    gc.collect()  # garbage first: a frozen object is never freed
    gc.freeze()
