"""`medlora serve`: the real server as a subprocess on 127.0.0.1, called with the real `openai` client, plain HTTP,
a 60-second load test, a hypothesis fuzz of request bodies and a real browser (Playwright + Debian's chromium).

Two servers: the tiny random model where the words do not matter (errors, auth, queue, load, fuzz) and the bundled
SmolLM2 where they do (answers equal to `medlora chat`, usage counts, the page). The tiny model's greedy answer is
a run of blank lines, so its server samples by default (--mode sample) and tests that compare answers send a seed."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medlora.errors import MedloraError
from medlora.safety import NOTICE_HEADER

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
KEY = "test-key-7f3a"
QUESTION = "What are the symptoms of anemia?"
RED_FLAG = "I have crushing chest pain right now, what do I do?"
LOAD_SECONDS = float(os.environ.get("MEDLORA_SERVE_LOAD_SECONDS", "60"))


# ---------------------------------------------------------------- a server in a subprocess

class Server:
    def __init__(self, tmp: Path, *args: str):
        self.log_path = tmp / "server.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        env.pop("MEDLORA_API_KEY", None)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "medlora", "serve", *args, "--port", "0"],
                                         stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=tmp)
        self.port = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.port is None and (m := re.search(r"listening on http://127\.0\.0\.1:(\d+)/", self.log())):
                self.port = int(m.group(1))
            if self.port is not None and self.get("/health")[0] == 200:
                return
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server did not become ready:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def conn(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body=None, key: str | None = KEY, headers: dict | None = None,
                timeout: float = 120):
        """(status, headers, parsed JSON or raw bytes)."""
        c = self.conn(timeout)
        try:
            h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
                 **(headers or {})}
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
            raw = r.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw
            return r.status, dict(r.getheaders()), parsed
        except OSError:
            return None, {}, None
        finally:
            c.close()

    def get(self, path: str, key: str | None = KEY):
        return self.request("GET", path, key=key, timeout=10)

    def post(self, body, **kw):
        return self.request("POST", "/v1/chat/completions", body, **kw)

    def queue(self) -> dict:
        return self.get("/health")[2]["queue"]

    def wait_queue(self, test, seconds: float = 60) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            q = self.queue()
            if test(q):
                return q
            time.sleep(0.1)
        raise AssertionError(f"queue never reached the expected state: {self.queue()}")

    def wait_log_line(self, text: str, count: int = 1, seconds: float = 30) -> str:
        """The ``count``-th log line containing ``text``, once it is there (at most one more is allowed)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            lines = [ln for ln in self.log().splitlines() if text in ln]
            if len(lines) >= count:
                assert len(lines) == count, lines
                return lines[count - 1]
            time.sleep(0.1)
        raise AssertionError(f"no log line with {text!r}: {self.log()[-2000:]}")

    def request_line(self, request_id: str) -> str:
        return self.wait_log_line(f"id={request_id} ")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def open_stream(server: Server, body: dict, key: str | None = KEY):
    """A streaming request left open: (connection, response)."""
    c = server.conn()
    c.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}).encode(),
              headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    return c, c.getresponse()


def read_events(response, limit: int | None = None) -> list:
    """The SSE data payloads (parsed JSON, or the string '[DONE]'), up to ``limit`` of them."""
    events = []
    while limit is None or len(events) < limit:
        line = response.readline()
        if not line:
            break
        line = line.decode().rstrip("\r\n")
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
            if data == "[DONE]":
                break
    return events


def hang_up(conn: http.client.HTTPConnection) -> None:
    import socket

    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def assert_error(status, body, code: int, param=None, error_code=None):
    assert status == code, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if error_code is not None:
        assert body["error"]["code"] == error_code, body


def wait_until(test, seconds: float) -> None:
    """Poll ``test`` (bounded); the page's Content-Security-Policy forbids the eval that page.wait_for_function uses."""
    deadline = time.monotonic() + seconds
    while not test():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------- no server: options and binding rules

@pytest.mark.parametrize("argv, message", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 would let anyone who can reach this machine use the model"),
    (["--host", "192.168.1.5"], "give --api_key KEY (or set MEDLORA_API_KEY), or --insecure"),
    (["--api_key", " "], "the API key is empty"),
    (["--max_queue", "-1"], "--max_queue must be >= 0"),
    (["--max_tokens_limit", "0"], "--max_tokens_limit must be >= 1"),
])
def test_bad_options_fail_in_one_line_before_binding(argv, message, capsys, monkeypatch):
    from medlora.cli import main

    monkeypatch.delenv("MEDLORA_API_KEY", raising=False)
    assert main(["serve", "--model", "smollm2-135m", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medlora: error: ") and message in err


def test_binding_rules():
    from medlora.serve.server import api_key, check_binding, is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.2", "example.org"))
    check_binding("127.0.0.1", None, False)
    check_binding("0.0.0.0", "k", False)
    check_binding("0.0.0.0", None, True)
    with pytest.raises(MedloraError):
        check_binding("::", None, False)
    os.environ.pop("MEDLORA_API_KEY", None)
    assert api_key(None) is None
    os.environ["MEDLORA_API_KEY"] = "from-env"
    try:
        assert api_key(None) == "from-env" and api_key("flag") == "flag"
    finally:
        del os.environ["MEDLORA_API_KEY"]


def test_text_shaper_cuts_at_stop_strings_across_pieces():
    from medlora.serve.worker import TextShaper

    def run(pieces, stops):
        shaper, out = TextShaper(stops), []
        for p in pieces:
            text, hit = shaper.feed(p)
            out.append(text)
            if hit:
                return "".join(out), True
        return "".join(out) + shaper.flush(), False

    assert run(["  Hello", " wor", "ld. ", "END", " more"], ["END"]) == ("Hello world.", True)
    assert run(["a", "b\n", "\nc"], ["\n\n"]) == ("ab", True)        # the stop string spans two pieces
    assert run(["a\n", "b", "\n\n"], ["\n\n"]) == ("a\nb", True)
    assert run(["x E", "N", "D"], ["END"]) == ("x", True)
    assert run([" one ", "two ", " "], ["EN"]) == ("one two", False)  # whitespace stripped as chat strips it
    assert run(["E", "x"], ["END"]) == ("Ex", False)                   # a held-back prefix that was not a stop


def test_sampling_fields_map_onto_presets():
    from medlora.serve.schemas import ApiError, ChatRequest, Defaults, generation_params

    def params(**fields):
        return generation_params(ChatRequest(messages=[{"role": "user", "content": "x"}], **fields), Defaults())

    assert params()[0].settings() == {"do_sample": False, "max_new_tokens": 256} and params()[1] is False
    assert params(temperature=0)[0].do_sample is False
    assert params(temperature=0.001)[0].do_sample is False
    assert params(temperature=0.5, top_p=0)[0].do_sample is False
    p = params(temperature=0.5, top_p=0.8, max_tokens=7, seed=-1)[0]
    assert (p.do_sample, p.temperature, p.top_p, p.max_new_tokens, p.seed) == (True, 0.5, 0.8, 7, 2**32 - 2)
    # any integer is a fixed seed: never 2**32 - 1, which llama.cpp reads as "pick a random seed"
    assert [params(temperature=0.5, seed=s)[0].seed for s in (2**32 - 1, 2**33 - 2, 0)] == [0, 0, 0]
    assert params(max_completion_tokens=3, max_tokens=9)[0].max_new_tokens == 3
    sample = generation_params(ChatRequest(messages=[{"role": "user", "content": "x"}]), Defaults(mode="sample"))[0]
    assert (sample.do_sample, sample.temperature, sample.top_p) == (True, 0.7, 0.9)
    with pytest.raises(ApiError, match="above this server's limit of 1024"):
        params(max_tokens=1025)


# ---------------------------------------------------------------- the tiny model: protocol, errors, queue

@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, tiny_model_dir):
    server = Server(tmp_path_factory.mktemp("serve-tiny"), str(tiny_model_dir), "--backend", "hf", "--api_key", KEY,
                    "--mode", "sample",
                    "--max_new_tokens", "6", "--max_tokens_limit", "1500", "--max_queue", "4",
                    "--max_request_bytes", "200000", "--served_model_name", "tiny")
    yield server
    assert server.stop() == 0
    log = server.log()
    assert "Traceback" not in log and "status=500" not in log, log[-3000:]


def test_health_models_and_api_key(tiny_server):
    status, _, body = tiny_server.get("/health", key=None)
    assert status == 200 and body["status"] == "ok" and body["model"] == "tiny"
    status, headers, body = tiny_server.get("/v1/models", key=None)
    assert_error(status, body, 401, error_code="invalid_api_key")
    assert headers["www-authenticate"] == "Bearer"
    assert_error(*tiny_server.get("/v1/models", key="wrong")[::2], 401)
    assert_error(*tiny_server.post({"messages": user("hi")}, key=None)[::2], 401)
    status, _, body = tiny_server.get("/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"] and body["object"] == "list"
    assert tiny_server.get("/v1/models/tiny")[2]["id"] == "tiny"
    assert_error(*tiny_server.get("/v1/models/gpt-4")[::2], 404, error_code="model_not_found")
    status, headers, page = tiny_server.get("/", key=None)  # the page is static; it asks for the key itself
    assert status == 200 and b"not medical advice" in page and headers["content-type"].startswith("text/html")


def test_non_streaming_completion_and_the_system_prompt(tiny_server, tokenizer):
    from medlora.prompts import DEFAULT_SYSTEM_PROMPT

    status, headers, body = tiny_server.post({"model": "tiny", "messages": user(QUESTION), "max_tokens": 5, "seed": 1,
                                              "frequency_penalty": 0.5, "tools": [], "some_new_field": {"x": 1}})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"] == headers["x-request-id"]
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    counted = len(tokenizer.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                                 *user(QUESTION)], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"])
    assert body["usage"] == {"prompt_tokens": counted, "completion_tokens": 5, "total_tokens": counted + 5}
    # the request's own system message replaces the run's safety prompt
    own = [{"role": "system", "content": "Be brief."}, *user(QUESTION)]
    n_own = len(tokenizer.apply_chat_template(own, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])
    assert tiny_server.post({"messages": own, "max_tokens": 1})[2]["usage"]["prompt_tokens"] == n_own
    # a structured log line for the request: id, tokens in/out, time to first token, tokens/s, status
    line = tiny_server.request_line(body["id"])
    for field in ("status=200", f"tokens_in={counted}", "tokens_out=5", "ttft_s=", "tok_s=", "finish=length"):
        assert field in line, line


def test_streaming_chunks_follow_openai(tiny_server):
    conn, r = open_stream(tiny_server, {"messages": user(QUESTION), "max_tokens": 6, "seed": 2,
                                        "stream_options": {"include_usage": True}})
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = read_events(r)
    conn.close()
    assert events[-1] == "[DONE]"
    first, *middle, final, usage_chunk, _ = events
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    assert all(set(e["choices"][0]["delta"]) == {"content"} and e["choices"][0]["finish_reason"] is None
               for e in middle) and middle
    assert final["choices"][0]["finish_reason"] == "length" and final["choices"][0]["delta"] == {}
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    assert len({e["id"] for e in events[:-1]}) == 1
    streamed = "".join(e["choices"][0]["delta"]["content"] for e in middle)
    whole = tiny_server.post({"messages": user(QUESTION), "max_tokens": 6, "seed": 2})[2]
    assert streamed == whole["choices"][0]["message"]["content"]  # the same seed: the same answer either way
    assert whole["usage"] == usage_chunk["usage"]
    # without include_usage there is no usage chunk
    conn, r = open_stream(tiny_server, {"messages": user(QUESTION), "max_tokens": 2})
    events = read_events(r)
    conn.close()
    assert events[-2]["choices"][0]["finish_reason"] == "length" and "usage" not in events[-2]


def test_stop_strings_cut_the_answer(tiny_server):
    full = tiny_server.post({"messages": user(QUESTION), "max_tokens": 12, "seed": 3})[2]["choices"][0]["message"][
        "content"]
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2][:3]  # a piece of the third word
    cut = full[:full.index(stop)].rstrip()
    for stream in (False, True):
        body = {"messages": user(QUESTION), "max_tokens": 12, "seed": 3, "stop": [stop, "never-seen"], "stream": stream}
        if stream:
            conn, r = open_stream(tiny_server, {**body, "stream_options": {"include_usage": True}})
            events = read_events(r)
            conn.close()
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1] if e["choices"])
            finish = events[-3]["choices"][0]["finish_reason"]
        else:
            out = tiny_server.post(body)[2]
            text, finish = out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"]
        assert (text, finish) == (cut, "stop")


def test_emergency_guard_is_in_every_answer(tiny_server):
    out = tiny_server.post({"messages": user(RED_FLAG), "max_tokens": 3, "stop": "\n"})[2]
    assert out["choices"][0]["message"]["content"].startswith(NOTICE_HEADER)  # a stop string never cuts the notice
    conn, r = open_stream(tiny_server, {"messages": user(RED_FLAG), "max_tokens": 3})
    events = read_events(r)
    conn.close()
    assert events[1]["choices"][0]["delta"]["content"].startswith(NOTICE_HEADER)


def test_a_follow_up_keeps_the_notice_and_sent_back_notices_do_not_count_as_the_models_words(tiny_server):
    """What a client sends back after an emergency: the first answer as it was shown (notice included) and a follow-up
    that alone matches nothing. The answer starts with the notice again; the notice sent back is not prompt: the
    prompt is as long as with the model's own words alone."""
    from medlora.safety import check

    first = tiny_server.post({"messages": user(RED_FLAG), "max_tokens": 3})[2]["choices"][0]["message"]["content"]
    notice = check(RED_FLAG).notice + "\n\n"
    assert first.startswith(notice)
    follow_up = "should I take an aspirin or drive to the hospital myself?"

    def ask(answer):
        messages = [*user(RED_FLAG), {"role": "assistant", "content": answer}, *user(follow_up)]
        return tiny_server.post({"messages": messages, "max_tokens": 2})[2]

    shown, bare = ask(first), ask(first.removeprefix(notice))
    assert shown["choices"][0]["message"]["content"].startswith(NOTICE_HEADER)
    assert shown["usage"]["prompt_tokens"] == bare["usage"]["prompt_tokens"]


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    (b"", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, None),
    ({"messages": []}, 400, "messages", None),
    ({}, 400, "messages", None),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, None, None),
    ({"messages": user("x"), "temperature": "hot"}, 400, "temperature", None),
    ({"messages": user("x"), "temperature": 2.5}, 400, "temperature", None),
    ({"messages": user("x"), "max_tokens": True}, 400, "max_tokens", None),
    ({"messages": user("x"), "max_tokens": 0}, 400, "max_tokens", None),
    ({"messages": user("x"), "max_tokens": 1501}, 400, "max_tokens", "max_tokens_too_large"),
    ({"messages": user("x"), "stream": "yes"}, 400, "stream", None),
    ({"messages": user("x"), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"messages": user("x"), "n": 2}, 400, "n", None),
    ({"model": "gpt-4o", "messages": user("x")}, 404, "model", "model_not_found"),
    ({"messages": user("word " * 2100)}, 400, "messages", "context_length_exceeded"),
    ({"messages": user("word " * 1000), "max_tokens": 1400}, 400, "messages", "context_length_exceeded"),
    ({"messages": user("x" * 250_000)}, 413, None, "request_too_large"),
])
def test_bad_requests_get_openai_errors(tiny_server, body, status, param, code):
    assert_error(*tiny_server.post(body)[::2], status, param, code)


def test_unknown_routes_and_methods_are_json_errors(tiny_server):
    assert_error(*tiny_server.get("/v1/nothing")[::2], 404)
    assert_error(*tiny_server.request("DELETE", "/v1/chat/completions")[::2], 405)


def test_a_client_that_hangs_up_stops_its_generation(tiny_server):
    conn, r = open_stream(tiny_server, {"messages": user(QUESTION), "max_tokens": 1400, "seed": 4})
    first = read_events(r, 3)
    request_id = first[0]["id"]
    hang_up(conn)
    line = tiny_server.request_line(request_id)
    tokens_out = int(re.search(r"tokens_out=(\d+)", line).group(1))
    assert "finish=cancelled" in line and tokens_out < 700, line  # stopped, far from its 1400 tokens
    tiny_server.wait_queue(lambda q: q["running"] == 0 and q["waiting"] == 0, 10)
    # the same without streaming: the server notices the closed connection while it generates
    cancelled = tiny_server.queue()["cancelled"]
    conn = tiny_server.conn()
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": user(QUESTION), "max_tokens": 1400,
                                                                  "seed": 4}).encode(),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    tiny_server.wait_queue(lambda q: q["running"] == 1)
    hang_up(conn)
    q = tiny_server.wait_queue(lambda q: q["running"] == 0 and q["waiting"] == 0, 30)
    assert q["cancelled"] == cancelled + 1


def test_a_full_queue_answers_429_with_retry_after(tiny_server):
    long = {"messages": user(QUESTION), "max_tokens": 1400, "seed": 4}
    open_conns = []
    try:
        conn, r = open_stream(tiny_server, long)
        open_conns.append(conn)
        read_events(r, 2)  # generating
        for _ in range(4):  # --max_queue 4
            conn, r = open_stream(tiny_server, long)
            open_conns.append(conn)
        tiny_server.wait_queue(lambda q: q["waiting"] == 4 and q["running"] == 1)
        status, headers, body = tiny_server.post(long)
        assert_error(status, body, 429, error_code="queue_full")
        assert int(headers["retry-after"]) >= 1
    finally:
        for conn in open_conns:
            hang_up(conn)
    q = tiny_server.wait_queue(lambda q: q["running"] == 0 and q["waiting"] == 0)
    assert q["rejected"] >= 1


def test_max_queue_zero_answers_one_request_at_a_time(tmp_path, tiny_model_dir):
    """--max_queue 0: none waits, but an idle server answers (it used to refuse every request with 429); /health
    tells the chat page the --max_tokens_limit, which sizes its Max tokens box."""
    server = Server(tmp_path, str(tiny_model_dir), "--backend", "hf", "--max_queue", "0", "--max_new_tokens", "3",
                    "--max_tokens_limit", "300")
    try:
        for _ in range(2):
            status, _, out = server.post({"messages": user(QUESTION)}, key=None)
            assert status == 200 and out["usage"]["completion_tokens"] <= 3, out
        health = server.get("/health", key=None)[2]
        assert health["max_tokens_limit"] == 300 and health["queue"]["rejected"] == 0
    finally:
        assert server.stop() == 0


def test_the_llama_cpp_backend_serves_the_same_protocol(tmp_path, tiny_model_dir, tokenizer):
    pytest.importorskip("xllamacpp")
    from medlora.export.exporter import export
    from medlora.prompts import DEFAULT_SYSTEM_PROMPT

    gguf = export(tiny_model_dir, quant="f16", output=tmp_path / "tiny.gguf", progress=False, modelfile=False)
    server = Server(tmp_path, str(gguf), "--backend", "llamacpp", "--mode", "sample", "--threads", "1")
    try:
        assert "llama.cpp" in server.get("/health")[2]["description"]
        body = {"messages": user(QUESTION), "max_tokens": 6, "seed": 5}
        status, _, out = server.post(body)
        assert status == 200 and out["model"] == "tiny" and out["choices"][0]["finish_reason"] == "length"
        n_prompt = len(tokenizer.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                                      *user(QUESTION)], add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
        assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 6, "total_tokens": n_prompt + 6}
        conn, r = open_stream(server, {**body, "stream_options": {"include_usage": True}})
        events = read_events(r)
        conn.close()
        assert events[-1] == "[DONE]" and events[-2]["usage"] == out["usage"]
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == out["choices"][0][
            "message"]["content"]
        assert server.post({"messages": user(RED_FLAG), "max_tokens": 2})[2]["choices"][0]["message"][
            "content"].startswith(NOTICE_HEADER)
        conn, r = open_stream(server, {"messages": user(QUESTION), "max_tokens": 1000, "seed": 5})
        request_id = read_events(r, 3)[0]["id"]
        hang_up(conn)
        line = server.request_line(request_id)
        assert "finish=cancelled" in line and int(re.search(r"tokens_out=(\d+)", line).group(1)) < 500, line
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.log()


# ---------------------------------------------------------------- fuzz: random bodies, never a 500

def test_fuzzed_request_bodies_never_crash_the_server(tiny_server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
    anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=6), inner, max_size=3), max_leaves=8)
    text = st.text(max_size=60)
    part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                                     "content": text | st.lists(part, max_size=2)})
    fields = {  # valid values; small token counts keep valid requests cheap
        "model": st.just("tiny"), "stream": st.booleans(), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
        "max_tokens": st.integers(1, 4), "max_completion_tokens": st.integers(1, 4), "seed": st.integers(),
        "stop": text | st.lists(st.text(max_size=3), max_size=4), "n": st.just(1),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "repetition_penalty": st.floats(0.1, 10), "frequency_penalty": anything, "tools": anything}
    valid = st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=3)}, optional=fields)

    def spoil(body, key, value, where):  # one field (or a message's field) replaced by any JSON value
        body = json.loads(json.dumps(body))
        if where == "message" and body["messages"]:
            body["messages"][0][key if key in ("role", "content") else "content"] = value
        elif key != "max_tokens" or not isinstance(value, int):  # a valid large max_tokens is only slow
            body[key] = value
        return body

    spoiled = st.builds(spoil, valid, st.sampled_from(["messages", "role", "content", *fields]), anything,
                        st.sampled_from(["body", "message"]))
    raw = (valid | spoiled | anything).map(lambda b: json.dumps(b).encode()) | st.binary(max_size=40)
    seen: dict[int, int] = {}

    @settings(max_examples=int(os.environ.get("MEDLORA_SERVE_FUZZ_EXAMPLES", "80")), deadline=None,
              database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(raw)
    def fuzz(body):
        status, headers, out = tiny_server.request("POST", "/v1/chat/completions", body, timeout=60)
        seen[status] = seen.get(status, 0) + 1
        assert status is not None and status < 500, (body, out)
        if status >= 400:
            assert_error(status, out, status)
        elif headers["content-type"].startswith("text/event-stream"):
            assert out.rstrip().endswith(b"data: [DONE]"), out
        else:
            assert out["object"] == "chat.completion", out

    fuzz()
    print(f"fuzz: statuses {seen}")
    assert seen.get(200, 0) >= 20 and seen.get(400, 0) >= 20, seen  # the fuzz reached both valid and invalid bodies
    assert "Traceback" not in tiny_server.log() and "status=500" not in tiny_server.log()


# ---------------------------------------------------------------- load: 16 streaming clients + malformed requests

def settled_count(server, text: str, until: int | None = None, timeout: float = 10) -> int:
    """How often ``text`` is in the server's log once it stops changing (or reaches ``until``): the middleware writes
    a request's line after the client has its response. Bounded: at most ``timeout`` seconds."""
    deadline, count = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = server.log().count(text)
        if now == until or (until is None and now == count):
            return now
        count = now
    return server.log().count(text)


@pytest.mark.slow
def test_load_sixteen_streaming_clients_and_malformed_requests(tiny_server):
    import psutil

    proc = psutil.Process(tiny_server.proc.pid)
    for _ in range(3):  # warm up every path once before the baseline
        tiny_server.post({"messages": user(QUESTION), "max_tokens": 4})
        tiny_server.post(b"{bad")
    tiny_server.wait_queue(lambda q: q["running"] == 0 and q["waiting"] == 0)
    rss_before = proc.memory_info().rss
    # a request's log line is written after its response has gone: count once the last warm-up's line is there
    logged_before = settled_count(tiny_server, "path=/v1/chat/completions ")
    deadline = time.monotonic() + LOAD_SECONDS
    results: list[str] = []
    problems: list[str] = []
    lock = threading.Lock()

    def note(outcome: str, problem: str | None = None):
        with lock:
            results.append(outcome)
            if problem:
                problems.append(problem)

    def streaming_client(seed: int):
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            n = rng.randint(1, 12)
            try:
                conn, r = open_stream(tiny_server, {"messages": user(f"{QUESTION} ({seed})"), "max_tokens": n,
                                                    "stream_options": {"include_usage": True}})
                if r.status == 429:
                    body = json.loads(r.read())
                    conn.close()
                    ok = body["error"]["code"] == "queue_full" and int(r.getheader("retry-after")) >= 1
                    note("429", None if ok else f"bad 429: {body}")
                    time.sleep(rng.uniform(0.2, 0.8))
                    continue
                events = read_events(r)
                conn.close()
                complete = (r.status == 200 and events[-1] == "[DONE]"
                            and events[0]["choices"][0]["delta"].get("role") == "assistant"
                            and events[-3]["choices"][0]["finish_reason"] in ("stop", "length")
                            and events[-2]["usage"]["completion_tokens"] <= n)
                note("complete", None if complete else f"incomplete stream: {r.status} {events[-3:]}")
            except Exception as e:  # noqa: BLE001 - every failure is collected and reported below
                note("exception", f"{type(e).__name__}: {e}")

    bad_bodies = [b"{oops", b"[]", json.dumps({"messages": []}).encode(),
                  json.dumps({"messages": user("x"), "temperature": "warm"}).encode(),
                  json.dumps({"model": "nope", "messages": user("x")}).encode(),
                  json.dumps({"messages": user("x"), "max_tokens": 10**6}).encode(),
                  json.dumps({"messages": user("word " * 2100)}).encode(), b"x" * 250_000]

    def malformed_client():
        rng = random.Random(99)
        while time.monotonic() < deadline:
            body = rng.choice(bad_bodies)
            key = KEY if rng.random() > 0.1 else None
            status, _, out = tiny_server.post(body, key=key, timeout=60)
            good = (status is not None and 400 <= status < 500 and isinstance(out, dict)
                    and set(out.get("error", {})) == {"message", "type", "param", "code"})
            note("4xx" if good else "bad-4xx", None if good else f"malformed request got {status}: {out!r:.200}")
            time.sleep(rng.uniform(0.05, 0.2))

    threads = [threading.Thread(target=streaming_client, args=(i,), daemon=True) for i in range(16)]
    threads.append(threading.Thread(target=malformed_client, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(LOAD_SECONDS + 120)
    assert not any(t.is_alive() for t in threads), "a client never finished"
    assert not problems, problems[:5]
    counts = {k: results.count(k) for k in set(results)}
    assert counts.get("complete", 0) >= 16 and counts.get("4xx", 0) >= 20, counts
    # the server is up, the queue has drained, and every request was logged exactly once
    q = tiny_server.wait_queue(lambda q: q["running"] == 0 and q["waiting"] == 0, 30)
    assert tiny_server.proc.poll() is None and tiny_server.get("/health")[0] == 200
    logged = settled_count(tiny_server, "path=/v1/chat/completions ", logged_before + len(results)) - logged_before
    assert logged == len(results), (logged, counts)
    rss_after = proc.memory_info().rss
    tolerance = max(64 << 20, rss_before // 5)  # allocator slack, not a leak: a leak grows with the 60 s of traffic
    print(f"load: {counts}, queue {q}, RSS {rss_before >> 20} -> {rss_after >> 20} MiB")
    assert rss_after - rss_before <= tolerance, (rss_before >> 20, rss_after >> 20)
    assert "Traceback" not in tiny_server.log()


# ---------------------------------------------------------------- the bundled model: the openai client, the page

@pytest.fixture(scope="module")
def smol_server(tmp_path_factory, smol_dir):
    server = Server(tmp_path_factory.mktemp("serve-smol"), "--model", "smollm2-135m", "--backend", "hf",
                    "--max_tokens_limit", "512")
    yield server
    assert server.stop() == 0
    assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.fixture(scope="module")
def openai_client(smol_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{smol_server.port}/v1", api_key="no-key-needed",
                         max_retries=0, timeout=300)


@pytest.mark.slow
def test_openai_client_answers_equal_medlora_chat(openai_client, tokenizer, capsys):
    from medlora.chat import answer
    from medlora.cli import main
    from medlora.inference.backend import preset
    from medlora.inference.guard import GuardedBackend
    from medlora.inference.hf import load_backend
    from medlora.prompts import DEFAULT_SYSTEM_PROMPT

    n = 12
    assert [m.id for m in openai_client.models.list().data] == ["smollm2-135m"]
    done = openai_client.chat.completions.create(model="smollm2-135m", messages=user(QUESTION), max_tokens=n,
                                                 temperature=0)
    content = done.choices[0].message.content
    assert done.choices[0].finish_reason == "length" and content
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *user(QUESTION)]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (
        len(prompt_ids), n, len(prompt_ids) + n)

    chunks = list(openai_client.chat.completions.create(model="smollm2-135m", messages=user(QUESTION), max_tokens=n,
                                                        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == done.usage.model_dump()

    backend = GuardedBackend(load_backend(model="smollm2-135m"))
    assert answer(backend, QUESTION, preset("greedy", max_new_tokens=n)) == content
    capsys.readouterr()
    assert main(["chat", "--model", "smollm2-135m", "--backend", "hf", "-q", QUESTION, "--max_new_tokens",
                 str(n)]) == 0
    assert capsys.readouterr().out.strip() == content


@pytest.mark.slow
def test_chat_page_in_a_real_browser(smol_server):
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (make setup installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    url = f"http://127.0.0.1:{smol_server.port}/"
    logged = settled_count(smol_server, "path=/v1/chat/completions")  # the earlier tests' lines are all written
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                    args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 760})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url)
            page.wait_for_selector("#status[data-state='ok']", timeout=30_000)
            assert "not medical advice" in page.inner_text("#disclaimer")
            assert "emergency number" in page.inner_text("#emergency-line")
            wait_until(lambda: page.locator("#model").inner_text() == "smollm2-135m", 10)

            # 1. a question: the answer streams in (its text grows while the answer is still streaming)
            page.fill("#max-tokens", "40")
            page.fill("#question", QUESTION)
            page.click("#send")
            answer = page.locator(".msg.assistant").nth(0)
            lengths = []
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and answer.get_attribute("data-state") == "streaming":
                lengths.append(len(answer.locator(".text").inner_text()))
                page.wait_for_timeout(50)
            assert answer.get_attribute("data-state") == "done"
            growing = sorted({n for n in lengths if n > 0})
            assert len(growing) >= 3, lengths  # seen at three or more lengths before it was complete
            assert answer.locator(".text").inner_text().strip() and "tokens" in answer.locator(".meta").inner_text()

            # 2. a second (longer) answer, stopped mid-way: the text stops growing and the server stops generating
            # (a long list: "And how is it treated?" could end within the poll that saw its first 20 characters,
            # and the stop button is gone by the click; measured, this one runs to the 400-token limit)
            page.fill("#max-tokens", "400")
            page.fill("#question", "List twenty ways it is treated, one per line, numbered.")
            page.keyboard.press("Enter")
            second = page.locator(".msg.assistant").nth(1)
            wait_until(lambda: len(second.locator(".text").inner_text()) > 20, 240)
            assert second.get_attribute("data-state") == "streaming", second.locator(".text").inner_text()
            page.click("#stop")
            page.wait_for_selector(".msg.assistant[data-state='stopped']", timeout=10_000)
            stopped_text = second.locator(".text").inner_text()
            page.wait_for_timeout(1500)
            assert second.locator(".text").inner_text() == stopped_text
            assert "stopped" in second.locator(".meta").inner_text()
            smol_server.wait_queue(lambda q: q["running"] == 0, 30)
            line = smol_server.wait_log_line("path=/v1/chat/completions", logged + 2)  # the second answer's
            assert "finish=cancelled" in line and int(re.search(r"tokens_out=(\d+)", line).group(1)) < 400, line
            assert page.locator(".msg.user").count() == 2  # multi-turn: both questions stay on the page

            assert all(u.startswith(url) for u in requests), requests  # no external assets
            page.screenshot(path=str(ARTIFACTS / "serve-page.png"))
            page.set_viewport_size({"width": 390, "height": 760})  # a phone: the layout still fits
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
            page.screenshot(path=str(ARTIFACTS / "serve-page-narrow.png"))
        finally:
            browser.close()
