"""The llama.cpp backend: a GGUF file (``medlora export``) run by llama.cpp's server code in this process, through
the prebuilt ``xllamacpp`` wheel (pip install xllamacpp). Same interface as the transformers backend (hf.py).

``Server.handle_chat_completions`` applies the GGUF's chat template, generates, and hands each streamed chunk
to a callback; it blocks until the answer is complete (releasing the GIL), so it runs in a worker thread and
the chunks reach the caller through a queue. The callback's return value stops generation (True: stop).

The wrapper also opens llama.cpp's HTTP server on a loopback port; it gets a random API key, so nothing else on
the machine can use it, and medlora calls only its /apply-template and /tokenize routes (count_tokens).
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import tempfile
import threading
import urllib.request
from pathlib import Path

from ..cpu import busy_elsewhere, usable_cpus
from ..errors import MedloraError
from ..prompts import DEFAULT_SYSTEM_PROMPT
from .backend import GenerationParams, TextStream

DEFAULT_CONTEXT = 4096
HF_DEFAULT_TOP_K = 50  # transformers samples from the 50 likeliest tokens unless told otherwise; so does this


def default_threads() -> int:
    """The CPUs this process may use, less those other processes keep busy now (cpu.busy_elsewhere, a quarter
    of a second of /proc/stat: the 1-minute load average still counted a training run that had just ended, so
    the chat after it got 1 thread of 2).

    llama.cpp's OpenMP threads spin while they wait for each other: one more thread than there are free cores
    and every token waits on a descheduled thread (measured, 2 cores with one busy: 2 threads 0.4-0.7 tokens/s,
    1 thread 40). Setting OMP_WAIT_POLICY=passive before the process starts also avoids that (34 tokens/s)."""
    n = usable_cpus()
    return max(1, min(n, n - round(busy_elsewhere())))


def request_body(messages: list[dict], params: GenerationParams, n_ctx: int = DEFAULT_CONTEXT) -> dict:
    """The chat-completions request for these messages and decoding settings, with transformers' meaning:
    greedy is temperature 0 / top_k 1; sampling uses temperature, top_p, top_k 50, no min_p, and a repetition
    penalty over the whole context (prompt included), as transformers applies it."""
    params.validate()
    body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "n_predict": params.max_new_tokens, "max_tokens": params.max_new_tokens,
            "repeat_penalty": params.repetition_penalty or 1.0, "repeat_last_n": n_ctx,
            "cache_prompt": False}  # reusing an earlier prompt's KV cache changes the arithmetic slightly, so a
    # greedy answer would depend on what was asked before; re-reading the prompt keeps it the same every time
    if params.do_sample:
        body.update(temperature=params.temperature if params.temperature is not None else 1.0,
                    top_p=params.top_p if params.top_p is not None else 1.0, top_k=HF_DEFAULT_TOP_K, min_p=0.0)
    else:
        body.update(temperature=0.0, top_k=1)
    if params.seed is not None:
        body["seed"] = int(params.seed)
    return body


def _chunk_error(chunk) -> str | None:
    if not isinstance(chunk, dict):
        return f"unexpected reply {chunk!r:.200}"
    err = chunk.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    if "choices" not in chunk and "message" in chunk:
        return str(chunk["message"])
    return None


class _CaptureStderr:
    """llama.cpp's native log goes to file descriptor 2: keep it off the terminal while a model loads, and keep
    its error lines for a one-line message."""

    def __enter__(self):
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode("utf-8", "replace")
        self.file.close()
        return False

    def reason(self) -> str:
        lines = [ln.strip() for ln in self.text.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
        return lines[0].split(": ", 1)[-1][:200] if lines else ""


_NEVER_FREED: list = []


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self, gguf_path: str | Path, system_prompt: str = DEFAULT_SYSTEM_PROMPT, threads: int | None = None,
                 n_ctx: int = DEFAULT_CONTEXT, description: str | None = None):
        try:
            import xllamacpp
        except ImportError:
            raise MedloraError("the llama.cpp backend needs the xllamacpp package: pip install xllamacpp") from None
        path = Path(gguf_path)
        if not path.is_file():
            raise MedloraError(f"{path}: no such GGUF file")
        threads = default_threads() if threads is None else int(threads)
        if threads < 1:
            raise MedloraError("threads must be >= 1")
        p = xllamacpp.CommonParams()
        p.model.path = str(path)
        p.n_ctx = int(n_ctx)
        p.n_parallel = 1
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        p.n_gpu_layers = 0
        p.verbosity = 1  # errors only
        p.warmup = False
        p.endpoint_slots = True  # llama.cpp's default, said here: _wait_ready asks /slots
        p.hostnames = ["127.0.0.1"]  # loopback only (llama.cpp's default too; said here so it stays so)
        self._key = secrets.token_urlsafe(24)
        p.api_keys = [self._key]
        with _CaptureStderr() as log:
            try:
                server = xllamacpp.Server(p)
            except Exception:  # noqa: BLE001 - the wrapper raises RuntimeError for any load failure
                server = None
        if server is None:
            why = log.reason()
            raise MedloraError(f"llama.cpp cannot load {path}" + (f": {why}" if why else " (not a GGUF model?)"))
        self._server = server
        self._wait_ready()
        self.path = path
        self.threads = threads
        self.n_ctx = int(n_ctx)
        self.system_prompt = system_prompt
        self.description = description or f"{path} (llama.cpp, {threads} thread{'s' if threads > 1 else ''})"

    def _wait_ready(self, limit_s: float = 60.0) -> None:
        """Return once llama.cpp's task loop runs. A Server freed before its loop starts hangs for ever in its
        destructor: the constructor returns before its thread enters ``start_loop()``, and a ``terminate()`` that
        comes first is overwritten when the loop starts (measured: a load-then-free loop hung within 3 rounds on
        a busy CPU). ``GET /slots`` is answered by that loop, so its answer means the loop runs. Bounded."""
        import time

        deadline = time.monotonic() + limit_s
        req = self._request("/slots")
        while True:
            try:
                with urllib.request.urlopen(req, timeout=limit_s):
                    return
            except OSError as e:  # not listening yet (refused), or a 503 while it starts
                if time.monotonic() > deadline:
                    _NEVER_FREED.append(self._server)  # freeing it could hang (above): left to the process's exit
                    raise MedloraError(f"llama.cpp's server did not start: {e}") from None
                time.sleep(0.01)

    # -- llama.cpp's own HTTP routes (template, tokenizer), on its loopback port
    def _request(self, route: str, body: dict | None = None) -> urllib.request.Request:
        """A GET (no ``body``) or a JSON POST to ``route``, with this backend's API key."""
        headers = {"Authorization": f"Bearer {self._key}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        data = None if body is None else json.dumps(body).encode()
        return urllib.request.Request(self._server.listening_address + route, data=data, headers=headers)

    def _call(self, route: str, body: dict | None = None) -> dict:
        try:
            with urllib.request.urlopen(self._request(route, body), timeout=60) as r:
                return json.loads(r.read())
        except OSError as e:
            raise MedloraError(f"llama.cpp {route} failed: {e}") from None

    def format_prompt(self, messages: list[dict]) -> str:
        """The prompt text llama.cpp makes of these messages (the GGUF's chat template, generation prompt added)."""
        return self._call("/apply-template", {"messages": messages})["prompt"]

    def tokenize(self, text: str) -> list[int]:
        """Token ids as llama.cpp encodes a prompt (special tokens parsed; BOS added where the model adds it)."""
        return self._call("/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]

    def eos_id(self) -> int | None:
        ids = self.tokenize(self._call("/props").get("eos_token") or "")
        return ids[0] if len(ids) == 1 else None

    def answer_logprobs(self, prompt_ids: list[int], answer_ids: list[int]) -> list[float]:
        """Teacher forcing through llama.cpp: log p(answer token | prompt, answer so far) for every answer token,
        in one request. A grammar of token ids (``<[id]>``) makes the sampler take exactly the answer's tokens;
        the reported log-probabilities are the model's own (softmax of its raw logits, before any sampler).
        A final end-of-turn token cannot be in such a grammar (llama.cpp aborts); once the grammar is complete
        it is the only token the sampler may take, so it is the last one generated, with its own probability."""
        answer = [int(t) for t in answer_ids]
        if not answer:
            return []
        eos = self.eos_id()
        forced = answer[:-1] if answer[-1] == eos else answer
        if not forced:
            raise MedloraError("the answer has no token before its end-of-turn token")
        body = {"prompt": [int(t) for t in prompt_ids], "n_predict": len(answer), "n_probs": 1,
                "grammar": "root ::= " + " ".join(f"<[{t}]>" for t in forced), "post_sampling_probs": False,
                "temperature": 0, "top_k": 1, "cache_prompt": False}
        if forced is not answer:  # of the end-of-generation tokens a complete grammar allows, take this one (the
            body["logit_bias"] = [[eos, 100.0]]  # bias acts in the sampler only: the reported logprob is unbiased
        reply = self._call("/completion", body)
        probs = reply.get("completion_probabilities") or []
        got = [c["id"] for c in probs]
        if got != answer:
            at = next((i for i, (a, b) in enumerate(zip(got, answer)) if a != b), min(len(got), len(answer)))
            raise MedloraError(f"llama.cpp did not follow the answer's tokens (token {at} of {len(answer)}: "
                               f"{got[at:at + 1]} instead of {answer[at:at + 1]})")
        return [float(c["logprob"]) for c in probs]

    # -- the interface
    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.tokenize(self.format_prompt(messages)))

    def stream(self, messages: list[dict], params: GenerationParams) -> TextStream:
        body = request_body(messages, params, self.n_ctx)
        n_prompt = self.count_tokens(messages)

        def pieces(stream: TextStream):
            stop = threading.Event()
            chunks: queue.Queue = queue.Queue()
            done = object()

            def on_chunk(chunk) -> bool:
                chunks.put(chunk)
                return stop.is_set()

            def work():
                try:
                    self._server.handle_chat_completions(body, on_chunk)
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
                    chunks.put(e)
                chunks.put(done)

            worker = threading.Thread(target=work, name="medlora-llamacpp", daemon=True)
            worker.start()
            try:
                while (chunk := chunks.get()) is not done:
                    if isinstance(chunk, BaseException):
                        raise MedloraError(f"llama.cpp failed: {chunk}")
                    error = _chunk_error(chunk)
                    if error:
                        raise MedloraError(f"llama.cpp failed: {error}")
                    usage = chunk.get("usage")
                    if usage:
                        stream.prompt_tokens = int(usage.get("prompt_tokens", stream.prompt_tokens))
                        stream.completion_tokens = int(usage.get("completion_tokens", 0))
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if choice.get("finish_reason"):
                            stream.finish_reason = "length" if choice["finish_reason"] == "length" else "stop"
                        if text:
                            yield text
            finally:
                stop.set()  # a no-op when generation finished; stops it when the caller gave up early
                worker.join()

        return TextStream(pieces, n_prompt)


def load_llamacpp_backend(gguf_path: str | Path, system_prompt: str | None = None,
                          threads: int | None = None) -> LlamaCppBackend:
    """A GGUF file (e.g. RUN/export/RUN-q8_0.gguf) in llama.cpp; ``system_prompt``: the run's (default: medlora's)."""
    return LlamaCppBackend(gguf_path, system_prompt or DEFAULT_SYSTEM_PROMPT, threads=threads)
