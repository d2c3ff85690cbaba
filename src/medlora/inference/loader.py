"""Which backend answers: ``--backend auto|hf|llamacpp`` for chat, eval and serve.

* ``hf``: transformers in fp32, a run's adapter merged into the weights in memory (an unmerged adapter costs
  seven extra matmuls per layer per token).
* ``llamacpp``: llama.cpp on the run's GGUF (``medlora export``'s file, exported on first use and reused).
* ``auto`` (default): llama.cpp where it loads, else ``hf`` with one line saying why.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from ..errors import MedloraError, log
from ..model import check_target
from ..prompts import DEFAULT_SYSTEM_PROMPT
from ..rundir import RunDir
from .backend import Backend, GenerationParams, TextStream

BACKENDS = ("auto", "hf", "llamacpp")


def check_backend_choice(backend: str, threads: int | None) -> None:
    if backend not in BACKENDS:
        raise MedloraError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    if threads is not None and threads < 1:
        raise MedloraError("--threads must be >= 1")


def _system_prompt(target: str | None) -> str:
    if target is None:
        return DEFAULT_SYSTEM_PROMPT
    path = Path(target)
    return RunDir.home(path).system_prompt() or DEFAULT_SYSTEM_PROMPT


class LlamaCppUnavailable(MedloraError):
    """llama.cpp cannot answer for this model here (no binding, a model the converter does not write, a GGUF it
    cannot load): ``auto`` falls back to transformers. Other errors (a damaged adapter, a model needing
    --trust_remote_code) are the user's to fix, whichever backend, and are raised as they are."""


def _llamacpp(target: str | None, model: str | None, threads: int | None, trust_remote_code: bool,
              quant: str, description: str):
    from ..export.exporter import cached_export
    from ..export.gguf import NotExportable
    from .llamacpp import load_llamacpp_backend

    if target is not None and model is not None:
        raise LlamaCppUnavailable("--model with a run folder (another base model) needs --backend hf")
    try:
        import xllamacpp  # noqa: F401 - checked before an export that would be of no use
    except ImportError:
        raise LlamaCppUnavailable("the llama.cpp backend needs the xllamacpp package: pip install xllamacpp") from None
    try:
        gguf = cached_export(target, quant, model, trust_remote_code)
    except NotExportable as e:
        raise LlamaCppUnavailable(str(e)) from None
    try:
        backend = load_llamacpp_backend(gguf, _system_prompt(target), threads)
    except MedloraError as e:
        raise LlamaCppUnavailable(str(e)) from None
    backend.description = f"{description} (llama.cpp {quant}, {backend.threads} thread" \
                          f"{'s' if backend.threads > 1 else ''})"
    return backend


def _fallback(backend: str, target, model, e: LlamaCppUnavailable) -> None:
    if backend == "llamacpp":
        raise e
    if target is not None and model is not None:
        return  # an override of a run's base model: hf is the only way, nothing to report
    log(f"llama.cpp is not available here ({e}); answering with transformers (--backend hf) instead")


def check_gguf_backend(target, backend: str) -> bool:
    """Whether ``target`` is a .gguf file; one refused with --backend hf (transformers cannot run it)."""
    if target is None or not str(target).endswith(".gguf"):
        return False
    if backend == "hf":
        raise MedloraError("a .gguf file runs in llama.cpp only (--backend auto or llamacpp)")
    return True


def open_backend(target: str | None, model: str | None = None, backend: str = "auto", threads: int | None = None,
                 trust_remote_code: bool = False, quant: str | None = None) -> Backend:
    """One model to chat with: a run folder, its merged model, any HF model folder, or (``target`` None) the
    base model ``model`` by name; a ``.gguf`` file runs in llama.cpp as it is."""
    from ..export.gguf import DEFAULT_QUANT

    check_backend_choice(backend, threads)
    if check_gguf_backend(target, backend):
        from ..export.gguf import gguf_system_prompt
        from .llamacpp import load_llamacpp_backend

        return load_llamacpp_backend(target, gguf_system_prompt(Path(target)), threads)
    check_target(target, model)
    if backend != "hf":
        try:
            return _llamacpp(target, model, threads, trust_remote_code, quant or DEFAULT_QUANT,
                             str(target) if target else f"base model {model}")
        except LlamaCppUnavailable as e:
            _fallback(backend, target, model, e)
    from .hf import load_backend  # torch and transformers load here, after the checks above

    return load_backend(target, model, trust_remote_code, merge=True)


class LlamaCppPair:
    """Eval's generator on llama.cpp: the base model's GGUF and the run's, switched by ``adapter(enabled)``
    as the transformers backend switches its adapter on and off."""

    name = "llamacpp"

    def __init__(self, base, tuned):
        self.base, self.tuned = base, tuned
        self.current = tuned
        self.system_prompt = tuned.system_prompt
        self.description = tuned.description

    @contextmanager
    def adapter(self, enabled: bool):
        before, self.current = self.current, (self.tuned if enabled else self.base)
        try:
            yield
        finally:
            self.current = before

    def count_tokens(self, messages: list[dict]) -> int:
        return self.current.count_tokens(messages)

    def stream(self, messages: list[dict], params: GenerationParams) -> TextStream:
        return self.current.stream(messages, params)


def open_eval_generator(run_dir: str, model: str | None, backend: str, hf_backend, threads: int | None = None,
                        trust_remote_code: bool = False, quant: str | None = None):
    """What generates eval's answers for the base model and the run: llama.cpp on two GGUFs, or the already
    loaded transformers backend (its adapter merged in for the fine-tuned answers)."""
    from ..export.gguf import DEFAULT_QUANT

    check_backend_choice(backend, threads)
    if backend != "hf":
        q = quant or DEFAULT_QUANT
        try:
            if model is not None:
                raise LlamaCppUnavailable("--model with a run folder (another base model) needs --backend hf")
            base_name = RunDir(run_dir).read_config_raw().get("model")
            tuned = _llamacpp(run_dir, None, threads, trust_remote_code, q, str(run_dir))
            base = _llamacpp(None, base_name, tuned.threads, trust_remote_code, q, f"base model {base_name}")
            base.system_prompt = tuned.system_prompt  # both answer under the run's system prompt
            return LlamaCppPair(base, tuned)
        except LlamaCppUnavailable as e:
            _fallback(backend, run_dir, model, e)
    return hf_backend
