"""One model, one CPU: a single worker thread generates one answer at a time, in the order requests arrived, from a
bounded wait queue. The event loop never blocks on the model: the worker hands each piece of text to the request's
asyncio queue, and a request whose client has gone sets ``cancelled``, which closes its TextStream (stopping the
generation) as soon as the next piece arrives."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from ..inference.backend import Backend, GenerationParams
from ..inference.guard import NOTICE_SEPARATOR


class TextShaper:
    """The answer's text as it streams: leading and trailing whitespace dropped (as ``TextStream.text()`` strips it,
    so a streamed answer equals the non-streamed one and chat's), and cut before the first ``stop`` string. Text that
    may be the start of a stop string, or trailing whitespace, is held back until the next piece shows what it is."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.started = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text to send now, whether a stop string ended the answer)."""
        self.buf += piece
        if not self.started:
            self.buf = self.buf.lstrip()
            if not self.buf:
                return "", False
            self.started = True
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)].rstrip(), ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])), default=0)
        cut = len(self.buf[:len(self.buf) - keep].rstrip())
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf.rstrip(), ""
        return out


def count_text_tokens(backend, text: str) -> int:
    """Tokens of an answer's text (for an answer cut by a stop string or a hang-up, whose stream never counted)."""
    if not text:
        return 0
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is not None:  # transformers
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    tokenize = getattr(backend, "tokenize", None)
    if tokenize is not None:  # llama.cpp (its tokenize adds BOS where the model has one)
        return len(tokenize(text)) - len(tokenize(""))
    return 0


@dataclass(eq=False)
class Job:
    id: str
    messages: list[dict]
    params: GenerationParams
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    received: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the worker thread; read after the ("end", None) event
    started: float | None = None
    first_text: float | None = None
    finished: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # stop, length, cancelled
    error: str | None = None

    def __post_init__(self):
        self.events: asyncio.Queue = asyncio.Queue()
        self.done: asyncio.Future = self.loop.create_future()

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    def __init__(self, backend: Backend, max_queue: int):
        self.backend = backend
        self.max_queue = max_queue
        self.waiting = 0
        self.running = 0
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="medlora-serve-worker", daemon=True)
        self._thread.start()

    def _no_room(self) -> bool:
        """Up to max_queue requests wait behind the one running; an idle worker always takes one (--max_queue 0:
        one at a time, none waiting)."""
        return self.waiting >= self.max_queue and bool(self.waiting or self.running)

    def full(self) -> bool:
        """Whether the wait queue is full (counted as a rejection: the caller answers 429)."""
        with self._lock:
            if self._no_room():
                self.counts["rejected"] += 1
                return True
            return False

    def submit(self, job: Job) -> bool:
        """Queue the job; False when the wait queue is full (the caller answers 429)."""
        with self._lock:
            if self._no_room():
                self.counts["rejected"] += 1
                return False
            self.waiting += 1
        self._jobs.put(job)
        return True

    def snapshot(self) -> dict:
        with self._lock:
            return {"waiting": self.waiting, "running": self.running, "max_queue": self.max_queue, **self.counts}

    def stop(self, timeout: float = 60) -> None:
        """Cancel the answer being generated and every waiting one, and wait (bounded) for the thread: torch must
        not be generating when the interpreter exits (that aborts the process)."""
        self._closing = True
        current = self._current
        if current is not None:
            current.cancel()
        self._jobs.put(None)
        self._thread.join(timeout)

    # -- the worker thread
    def _post(self, job: Job, kind: str, value=None) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: the server is shutting down
            job.cancel()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self.waiting -= 1
                self.running = 1
            self._current = job
            try:
                self._generate(job)
            except Exception as e:  # noqa: BLE001 - reported to the client and logged on one line
                job.error = " ".join(str(e).split())[:300] or type(e).__name__
            finally:
                job.finished = time.monotonic()
                self._current = None
                outcome = "failed" if job.error else ("cancelled" if job.finish_reason == "cancelled" else "completed")
                with self._lock:
                    self.running = 0
                    self.counts[outcome] += 1
                self._post(job, "end")
                try:
                    job.loop.call_soon_threadsafe(lambda j=job: j.done.done() or j.done.set_result(None))
                except RuntimeError:
                    pass

    def _generate(self, job: Job) -> None:
        if job.cancelled.is_set() or self._closing:  # the client left while waiting, or the server is stopping
            job.finish_reason = "cancelled"
            return
        job.started = time.monotonic()
        stream = self.backend.stream(job.messages, job.params)
        job.prompt_tokens = stream.prompt_tokens
        guard = getattr(stream, "guard", None)
        notice = guard.notice + NOTICE_SEPARATOR if guard is not None and guard.notice else None
        shaper = TextShaper(job.stops)
        model_text: list[str] = []
        finish = None
        try:
            for piece in stream:
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                if notice is not None and piece == notice:  # the guard's fixed notice: never cut or reshaped
                    notice = None
                    self._send(job, piece)
                    continue
                out, hit = shaper.feed(piece)
                if out:
                    model_text.append(out)
                    self._send(job, out)
                if hit:
                    finish = "stop"
                    break
            else:
                tail = shaper.flush()
                if tail:
                    model_text.append(tail)
                    self._send(job, tail)
        finally:
            stream.close()  # stops the generation when the loop above left early
        if finish is None:
            job.finish_reason = stream.finish_reason or "stop"
            job.completion_tokens = stream.completion_tokens
        else:
            job.finish_reason = finish
            job.completion_tokens = count_text_tokens(self.backend, "".join(model_text))

    def _send(self, job: Job, text: str) -> None:
        if job.first_text is None:
            job.first_text = time.monotonic()
        self._post(job, "text", text)
