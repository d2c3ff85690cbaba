"""The transformers backend: ``model.generate`` in fp32 on the CPU, streamed piece by piece.

``generate`` blocks until the answer is complete, so it runs in a worker thread and hands text pieces to
the caller through transformers' ``TextIteratorStreamer`` (the pattern its docs give for streaming); a
stopping criterion lets the caller stop it mid-answer (Ctrl-C in chat, a client that hangs up).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from ..model import check_target, load_model, load_run_model, load_tokenizer
from ..prompts import DEFAULT_SYSTEM_PROMPT
from ..rundir import RunDir
from .backend import GenerationParams, TextStream


class HFBackend:
    name = "hf"

    def __init__(self, model, tokenizer, system_prompt: str = DEFAULT_SYSTEM_PROMPT, description: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.description = description

    # -- the interface
    def encode(self, messages: list[dict]) -> dict:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)

    def count_tokens(self, messages: list[dict]) -> int:
        return int(self.encode(messages)["input_ids"].shape[1])

    def stream(self, messages: list[dict], params: GenerationParams) -> TextStream:
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer, set_seed

        enc = self.encode(messages)
        n_prompt = int(enc["input_ids"].shape[1])
        eos = self._eos_ids()

        def pieces(stream: TextStream):
            stop = threading.Event()

            class _Stop(StoppingCriteria):
                def __call__(self, input_ids, scores, **kw):
                    return stop.is_set()

            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            result: dict = {}

            def work():
                try:
                    with torch.inference_mode():
                        result["ids"] = self.model.generate(
                            **enc, **params.settings(), pad_token_id=self.tokenizer.pad_token_id, streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([_Stop()]))
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
                    result["error"] = e
                    streamer.end()

            if params.seed is not None:
                set_seed(params.seed)
            worker = threading.Thread(target=work, name="medlora-generate", daemon=True)
            worker.start()
            try:
                yield from streamer
            finally:
                stop.set()  # a no-op when generation finished; stops it when the caller gave up early
                worker.join()
            if "error" in result:
                raise result["error"]
            new = result["ids"][0, n_prompt:].tolist()
            stream.completion_tokens = len(new)
            stream.finish_reason = "stop" if new and new[-1] in eos else (
                "length" if len(new) >= params.max_new_tokens else "stop")

        return TextStream(pieces, n_prompt)

    # -- helpers for eval
    @contextmanager
    def adapter(self, enabled: bool):
        """Context in which a run's model answers with (fine-tuned) or without (base) its LoRA weights. The
        fine-tuned model has its adapter merged into the weights meanwhile: one matmul per projection instead
        of three, and the same numbers up to fp32 rounding."""
        if not hasattr(self.model, "disable_adapter"):  # a plain or merged model
            yield
        elif not enabled:
            with self.model.disable_adapter():
                yield
        else:
            self.model.merge_adapter()
            try:
                yield
            finally:
                self.model.unmerge_adapter()

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id if self.model.generation_config else None
        ids = ids if isinstance(ids, list) else [ids]
        return {i for i in ids + [self.tokenizer.eos_token_id] if i is not None}


def load_backend(target: str | None = None, model: str | None = None, trust_remote_code: bool = False,
                 merge: bool = False) -> HFBackend:
    """A run folder (its adapter on its base model; ``model`` overrides the base), a merged or plain HF model
    folder, or, with ``target`` None, the base model ``model`` by name. ``merge``: fold a run's adapter into
    the weights for good (chat: faster; eval keeps it separate to answer as the base model too)."""
    source = check_target(target, model)
    if target is None:
        return HFBackend(load_model(source, trust_remote_code), load_tokenizer(source, trust_remote_code),
                         DEFAULT_SYSTEM_PROMPT, f"base model {model}")
    path, run = Path(target), RunDir(Path(target))
    if run.is_finished_run():
        peft_model, tok, base_name = load_run_model(run, model, trust_remote_code)
        if merge:
            peft_model = peft_model.merge_and_unload()
        return HFBackend(peft_model, tok, run.system_prompt() or DEFAULT_SYSTEM_PROMPT,
                         f"{path} (adapter {'merged into' if merge else 'on'} {base_name})")
    prompt = DEFAULT_SYSTEM_PROMPT  # merged_model/ or any HF folder (check_target saw its config.json)
    if RunDir.is_merged_model(path):
        prompt = RunDir.home(path).system_prompt() or prompt
    return HFBackend(load_model(str(path), trust_remote_code), load_tokenizer(str(path), trust_remote_code),
                     prompt, str(path))
