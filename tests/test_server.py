"""The OpenAI-compatible server (sampling/server.py, `infer.py --serve`) on the trained `eval_run` model: the openai
client and lm-eval's `local-completions` model read what it writes, and get infer.py's and the in-process evaluation
adapter's numbers; 64 concurrent clients each get what they get alone; bad requests are 400s (a full queue a 429);
clients that leave are cancelled and their pages freed; SIGTERM lets the requests in flight finish and exits 0."""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO

# Small enough that 64 clients preempt rows and wait in the queue; the SIGTERM test's `infer.py --serve` uses the
# same settings, so it loads this process's compiled calls from the compilation cache.
ENGINE = dict(max_batch=8, page_size=8, num_pages=40, max_queue=64, chunk=16, prefill_rows=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """The eval_run model served in this process on a free port, with what the tests compare it to."""

    def __init__(self, workdir):
        import uvicorn

        from model import Transformer
        from sampling.engine import Engine, EngineConfig
        from sampling.server import Server
        from training.checkpoint import load_for_inference

        self.workdir = workdir
        self.run, self.params, self.tokenizer, _ = load_for_inference(workdir)
        self.engine = Engine(Transformer(self.run.model), self.params, self.tokenizer, EngineConfig(**ENGINE))
        self.port = free_port()
        app = Server(self.engine, self.tokenizer, "eval_run").app()
        # (log_config=None: uvicorn's handlers would hold pytest's captured stderr past its closing)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", log_config=None)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.uvicorn.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def served(eval_run):
    served = Served(eval_run)
    yield served
    served.stop()


def post(url: str, path: str, body, timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, headers (lower-case names), JSON body) of a POST of `body` (bytes as they are, else as JSON)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    response = conn.getresponse()
    status, raw = response.status, response.read()
    headers = {k.lower(): v for k, v in response.getheaders()}
    conn.close()
    return status, headers, json.loads(raw)


def sse(url: str, path: str, body: dict) -> list[dict]:
    """The chunks of a streamed response, checking it ends with [DONE]."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = response.read().decode().split("\n\n")
    conn.close()
    assert events[-2:] == ["data: [DONE]", ""], events[-3:]
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


def get(url: str, path: str) -> tuple[int, str]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    status, text = response.status, response.read().decode()
    conn.close()
    return status, text


def metrics(url: str) -> dict[str, float]:
    text = get(url, "/metrics")[1]
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}


def wait_idle(url: str, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["jaxlm_running_rows"] == 0 and m["jaxlm_queue_length"] == 0:
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.05)


def infer_greedy(served: Served, prompt: str, max_new_tokens: int) -> str:
    """What `infer.py --workdir W --prompt P --temperature 0 --max_new_tokens K` prints (its code, in process)."""
    from sampling.runner import Request, run_request

    out = io.StringIO()
    request = Request(prompts=[prompt], max_new_tokens=max_new_tokens, max_len=128, temperature=0.0)
    run_request(served.run.model, served.params, served.tokenizer, request, out)
    return out.getvalue()


PROMPT = "def f1_2(x):\n"


def test_the_openai_client_completes_chats_and_streams_as_infer_py_samples(served):
    client = served.client()
    assert [m.id for m in client.models.list().data] == ["eval_run"]
    greedy = client.completions.create(model="eval_run", prompt=PROMPT, max_tokens=24, temperature=0)
    assert greedy.object == "text_completion" and greedy.usage.completion_tokens == len(greedy.choices) * 24
    assert PROMPT + greedy.choices[0].text + "\n" == infer_greedy(served, PROMPT, 24)
    assert greedy.choices[0].finish_reason == "length"
    assert len(set(greedy.choices[0].text)) > 3  # (not one token over and over: a mix-up would show)

    stream = client.completions.create(model="eval_run", prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == greedy.choices[0].text

    # n samples: infer.py's --num_samples rows for the same seed (sample_index), in order.
    from sampling.runner import Request, run_request

    sampled = client.completions.create(
        model="m", prompt=PROMPT, max_tokens=12, temperature=1.0, n=3, seed=7, extra_body={"top_k": 40}
    )
    out = io.StringIO()
    rules = dict(max_new_tokens=12, max_len=128, num_samples=3, seed=7, temperature=1.0, top_k=40)
    run_request(served.run.model, served.params, served.tokenizer, Request(prompts=[PROMPT], **rules), out)
    want = "".join(f"=== prompt 1/1, sample {j + 1}/3 ===\n{PROMPT}{c.text}\n" for j, c in enumerate(sampled.choices))
    assert [c.index for c in sampled.choices] == [0, 1, 2] and out.getvalue() == want
    assert len({c.text for c in sampled.choices}) > 1

    # Stop strings: the text ends before the first one.
    line = greedy.choices[0].text.split("\n")[0]
    stopped = client.completions.create(model="m", prompt=PROMPT, max_tokens=24, temperature=0, stop=["\n", "zz"])
    assert stopped.choices[0].text == line and stopped.choices[0].finish_reason == "stop"

    # Logprobs: each generated token with its 3 likeliest alternatives (and itself); greedy picks the likeliest.
    scored = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8 and lp.text_offset[0] == 0
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and top[token] == value == max(top.values()) and value <= 0
    # Echo: the prompt's text first, its tokens' logprobs first (the first token's is null), as lm-eval reads them.
    echoed = client.completions.create(model="m", prompt=PROMPT, max_tokens=0, logprobs=0, echo=True)
    lp, ids = echoed.choices[0].logprobs, served.tokenizer.encode(PROMPT)
    assert echoed.choices[0].text == PROMPT and len(lp.tokens) == 1 + len(ids) and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and all(v < 0 for v in lp.token_logprobs[1:])

    # Chat: ChatML after the document start, ending at <|im_end|>: the completion of that text with that stop.
    messages = [{"role": "system", "content": "def f"}, {"role": "user", "content": "0_3(x):"}]
    chat = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0)
    chatml = "<|im_start|>system\ndef f<|im_end|>\n<|im_start|>user\n0_3(x):<|im_end|>\n<|im_start|>assistant\n"
    same = client.completions.create(model="m", prompt=chatml, max_tokens=16, temperature=0, stop="<|im_end|>")
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == same.choices[0].text and chat.usage == same.usage
    chunks = list(
        client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    chat = client.chat.completions.create(
        model="m", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    for entry in chat.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == entry.top_logprobs[0].logprob
        assert bytes(entry.bytes).decode(errors="replace") == entry.token


def test_lm_eval_local_completions_scores_as_the_in_process_adapter(served):
    """lm-eval's own API model, with nothing but the server's URL (it tokenizes through /tokenize), against
    experiments/harness.py's JaxLM on the same checkpoint: the same log-likelihoods and greedy flags."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from experiments.harness import JaxLM
    from sampling.scoring import Scorer

    pairs = [
        ("def f1_2(x):\n    return x *", " 2 + 1"),
        ("", "def f0_1(x):"),
        ("def f3_4(x):\n", "    return x * 4 + 3\n\n"),
        ("    return", " x"),
        ("def f2_5(x):\n    return x * 5 + 2\n\n" * 3, "def f2_6(x):"),
    ]
    requests = lambda: [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    theirs = LocalCompletionsAPI(base_url=f"{served.url}/v1/completions", model="m", max_length=128, batch_size=2)
    assert theirs.tokenizer_backend == "remote"
    ours = JaxLM(Scorer.load(workdir=served.workdir, batch_size=8)[0], progress=False)
    got, want = theirs.loglikelihood(requests(), disable_tqdm=True), ours.loglikelihood(requests())
    assert [g for _, g in got] == [g for _, g in want] and any(g for _, g in want) and not all(g for _, g in want)
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], rel=1e-5, abs=1e-4)


def test_64_concurrent_clients_each_get_what_they_get_alone(served):
    """Prompts of 8 to 100 tokens, 1 to 24 new tokens, a quarter of them streamed and a quarter echoed with logprobs:
    every answer is the one its request gets alone (greedy), and afterwards every page is free."""
    from sampling.decode import prompt_ids

    lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for i in range(4) for j in range(6)]
    asks = []
    for k in range(16):
        prompt = "".join(lines[k : k + k % 7 + 1])[: 20 + 23 * k]
        room = 128 - len(prompt_ids(served.tokenizer, prompt))
        asks.append({"prompt": prompt, "max_tokens": min(1 + (7 * k) % 24, room), "temperature": 0})
        if k % 4 == 1:  # (a row preempted while it prefills computes its prompt's logprobs again)
            asks[-1] |= {"echo": True, "logprobs": 1}
    alone = [post(served.url, "/v1/completions", ask)[2]["choices"][0] for ask in asks]
    before = metrics(served.url)

    def client(i: int) -> dict:
        ask = asks[i % 16]
        if i % 4 == 3:
            chunks = sse(served.url, "/v1/completions", ask)
            text = "".join(c["choices"][0]["text"] for c in chunks)
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": chunks[-1]["choices"][0]["finish_reason"]}  # fmt: skip
        status, _, body = post(served.url, "/v1/completions", ask)
        assert status == 200, body
        return body["choices"][0]

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(client, range(64)))
    for i, answer in enumerate(answers):
        assert answer == alone[i % 16], i
    assert sum(a["logprobs"] is not None for a in answers) == 16
    after = wait_idle(served.url)
    assert after["jaxlm_requests_total"] - before["jaxlm_requests_total"] == 64
    assert after["jaxlm_free_pages"] == after["jaxlm_total_pages"] == ENGINE["num_pages"] - 1
    assert after["jaxlm_preemptions_total"] > before["jaxlm_preemptions_total"]  # (the pool was short of pages)
    assert after["jaxlm_time_to_first_token_seconds_count"] - before["jaxlm_time_to_first_token_seconds_count"] == 64
    # Whether a crowded request finds another's pages in the prefix cache depends on timing (its twin may still be
    # prefilling, or the short pool may have evicted them); on the idle server a request sent twice always does.
    for _ in range(2):
        assert post(served.url, "/v1/completions", asks[15])[2]["choices"][0] == alone[15]
    hits = wait_idle(served.url)["jaxlm_prefix_cache_hit_tokens_total"] - after["jaxlm_prefix_cache_hit_tokens_total"]
    assert hits >= ENGINE["page_size"]


BAD = [
    (b"{not json", None, "not JSON"),
    (b"\xff\xfe", None, "not JSON"),
    (b"[" * 100_000, None, "not JSON"),
    (b"[1, 2]", None, "JSON object"),
    ({}, "prompt", "required"),
    ({"prompt": "x", "bogus": 1}, "bogus", "unknown field"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "an integer"),
    ({"prompt": "x", "max_tokens": 2.0}, "max_tokens", "an integer"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", ">= 0"),
    ({"prompt": "x", "n": 0}, "n", ">= 1"),
    ({"prompt": "x", "n": True}, "n", "an integer"),
    ({"prompt": "x", "n": 1000}, "n", "queues"),
    ({"prompt": "x", "temperature": -0.5}, "temperature", ">= 0"),
    ({"prompt": "x", "top_p": 0}, "top_p", "(0, 1]"),
    ({"prompt": "x", "top_k": -1}, "top_k", ">= 0"),
    ({"prompt": "x", "min_p": 2}, "min_p", "[0, 1]"),
    ({"prompt": "x", "seed": -3}, "seed", "[0, 2**32)"),
    ({"prompt": "x", "stream": "yes"}, "stream", "a boolean"),
    ({"prompt": "x", "stop": ""}, "stop", "non-empty"),
    ({"prompt": "x", "stop": ["a", 3]}, "stop", "non-empty"),
    ({"prompt": "x", "logprobs": 6}, "logprobs", "[0, 5]"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "only 0"),
    ({"prompt": "x", "best_of": 3}, "best_of", "equal to n"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": [[]]}, "prompt", "non-empty"),
    ({"prompt": ["x", 5]}, "prompt", "non-empty"),
    ({"prompt": [1, 10**6]}, "prompt", "not in [0, 320)"),
    ({"prompt": "x", "max_tokens": 500}, None, "context is 128"),
    ({"prompt": "x", "max_tokens": 0}, None, "max_tokens=0"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature", "must be"),
]
BAD_CHAT = [
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": "hi"}, "messages", "a list"),
    ({"messages": [{"role": "user"}]}, "messages", "a role and a content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages", "one of system"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs", "logprobs=true"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools", "unknown field"),
    ({"messages": [{"role": "user", "content": "x" * 600}]}, None, "context is 128"),
]


def test_bad_requests_are_400s_with_an_error_body_and_the_server_carries_on(served):
    cases = [("/v1/completions", *case) for case in BAD] + [("/v1/chat/completions", *case) for case in BAD_CHAT]
    for path, body, param, words in cases:
        status, _, answer = post(served.url, path, body)
        error = answer["error"]
        assert status == 400 and error["type"] == "invalid_request_error", (body, answer)
        assert error["param"] == param and words in error["message"], (body, error)
        assert set(error) == {"message", "type", "param", "code"}
    status, _, answer = post(served.url, "/v1/nowhere", {})
    assert status == 404 and "Not Found" in answer["error"]["message"]
    good = post(served.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert good[0] == 200 and good[2]["choices"][0]["finish_reason"] == "length"
    assert wait_idle(served.url)["jaxlm_free_pages"] == ENGINE["num_pages"] - 1
    assert get(served.url, "/health") == (200, '{"status":"ok"}')
    models = json.loads(get(served.url, "/v1/models")[1])
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["eval_run"]


def test_a_full_queue_is_a_429_and_clients_that_leave_are_cancelled(served):
    """Two clients queue 60 long samples; a third is refused with 429 and Retry-After. The two then hang up, one
    waiting for a whole answer, one mid-stream: the samples each left unfinished are cancelled, and every page is
    free."""
    before = metrics(served.url)
    ask = {"prompt": PROMPT, "max_tokens": 100, "temperature": 1.0, "n": 30}
    waiting = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    waiting.request("POST", "/v1/completions", json.dumps(ask), {"Content-Type": "application/json"})
    streaming = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    streaming.request("POST", "/v1/completions", json.dumps({**ask, "stream": True}), {"Content-Type": "application/json"})  # fmt: skip
    while metrics(served.url)["jaxlm_requests_total"] - before["jaxlm_requests_total"] < 60:
        time.sleep(0.02)
    status, headers, answer = post(served.url, "/v1/completions", ask)
    assert status == 429 and headers["retry-after"] == "1" and answer["error"]["type"] == "rate_limit_error"
    assert "waiting" in answer["error"]["message"]
    live = lambda m: m["jaxlm_requests_total"] - m["jaxlm_cancelled_requests_total"]
    assert live(metrics(served.url)) - live(before) == 60  # (it queued all or none: what it had queued it cancelled)

    def cancelled_after_hanging_up(connection) -> float:
        cancelled = lambda: metrics(served.url)["jaxlm_cancelled_requests_total"]
        start = cancelled()
        connection.close()
        deadline = time.monotonic() + 10
        while cancelled() - start < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        return cancelled() - start

    assert cancelled_after_hanging_up(waiting) >= 20  # (at most 8 rows have run, the rest were waiting)
    stream = streaming.getresponse()
    assert stream.status == 200 and stream.readline().startswith(b"data: ")  # (a first token has come)
    assert cancelled_after_hanging_up(streaming) >= 20
    after = wait_idle(served.url, timeout=30)
    assert after["jaxlm_finished_requests_total"] - before["jaxlm_finished_requests_total"] == after["jaxlm_requests_total"] - before["jaxlm_requests_total"]  # fmt: skip
    assert after["jaxlm_generated_tokens_total"] - before["jaxlm_generated_tokens_total"] < 60 * 100 / 2
    assert after["jaxlm_free_pages"] == after["jaxlm_total_pages"]


def test_chat_answers_end_at_a_templates_end_of_turn_token(tmp_path, served):
    """A Hugging Face directory's template (rendered with its special tokens, raising on bad input) and its
    end-of-turn tokens; an answer ends before such a token, as it does before the end-of-document token."""
    from data.chat import ChatError, read_template
    from sampling.engine import Event, SamplingParams
    from sampling.server import Choice

    tokenizer = served.tokenizer
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    config = {"chat_template": template, "bos_token": "<|endoftext|>", "eos_token": {"content": "def"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 0]}))
    chat = read_template(tmp_path, tokenizer)
    def_id = tokenizer.to_tokenizers().token_to_id("def")
    assert chat.stop_ids == {7, def_id} and chat.stop == ()  # (0, the end-of-document token, stops anyway)
    messages = [{"role": "user", "content": "hi"}]
    assert chat.render(messages) == "<|endoftext|>[user] hidef[assistant]"
    assert chat.prompt(tokenizer, messages) == tokenizer.encode("<|endoftext|>[user] hidef[assistant]")
    with pytest.raises(ChatError, match="no system"):
        chat.render([{"role": "system", "content": "x"}])

    ids = tokenizer.encode("    return x * 2\n")
    choice = Choice(0, 0, [0], None, SamplingParams(stop=("zz",)), frozenset({def_id}))
    seen = [choice.take(Event([t], [], tokenizer.decode([t]) if i < 3 else ""), tokenizer) for i, t in enumerate(ids)]
    ended = choice.take(Event([def_id], [], "", None), tokenizer)
    assert ended.finish_reason == "stop" and choice.text == tokenizer.decode(ids)  # (text held back comes out)
    assert "".join(e.text for e in [*seen, ended]) == choice.text and choice.tokens == [*ids, def_id]
    assert choice.take(Event([5], [], "x", "length"), tokenizer) is None


def test_tokenize_reads_a_special_tokens_name_as_the_token():
    """What lm-eval's remote tokenizer asks for the end-of-text token's id: the id, also for the byte tokenizer (whose
    text prompts spell the name in bytes)."""
    from data.tokenizer import EOD, ByteTokenizer
    from sampling.server import Server

    server = Server(None, ByteTokenizer())
    assert server.token_ids(EOD) == [256] and server.token_ids(f"a{EOD}") == list(f"a{EOD}".encode())
    assert server.token_ids("ab", document_start=True) == [256, 97, 98]
    assert server.token_text(256) == EOD and server.token_text(97) == "a"


def test_sigterm_lets_the_requests_in_flight_finish_and_exits_0(served):
    port = free_port()
    flags = [f"--{k}={v}" for k, v in ENGINE.items()]
    command = [sys.executable, "infer.py", "--workdir", str(served.workdir), "--serve", f"--port={port}", *flags]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            try:
                metrics(url)
                break
            except OSError:
                time.sleep(0.2)
        asks = [{"prompt": f"def f{i}_1(x):\n", "max_tokens": 48, "temperature": 0} for i in range(4)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(post, url, "/v1/completions", ask) for ask in asks]
            while metrics(url)["jaxlm_requests_total"] < 4:
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            done = [a.result() for a in answers]
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    for ask, (status, _, body) in zip(asks, done):
        alone = post(served.url, "/v1/completions", ask)[2]
        assert status == 200 and body["choices"][0]["text"] == alone["choices"][0]["text"]
        assert body["choices"][0]["finish_reason"] == alone["choices"][0]["finish_reason"]
    with pytest.raises(OSError):
        metrics(url)  # (nobody listens any more)


@pytest.fixture
def taken_port():
    with socket.create_server(("127.0.0.1", 0)) as held:
        yield held.getsockname()[1]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--serve", "--prompt", "x"], "--prompt: not with --serve"),
        (["--serve", "--temperature", "0", "--num_samples", "2"], "--num_samples, --temperature: not with --serve"),
        (["--serve", "--port", "70000"], "--port=70000: must be in [1, 65535]"),
        (["--serve", "--max_batch", "0"], "--max_batch=0: must be >= 1"),
        (["--serve", "--num_pages", "1"], "--num_pages=1: must be >= 2"),
        (["--prompt", "x", "--max_queue", "4"], "--max_queue: only with --serve"),
        (["--serve", "--port", "TAKEN"], "--host=127.0.0.1 --port=TAKEN: cannot listen there (Address already in use)"),
    ],
)
def test_infer_serve_bad_flags_are_one_line_and_exit_code_2(args, message, taken_port):
    args, message = [a.replace("TAKEN", str(taken_port)) for a in args], message.replace("TAKEN", str(taken_port))
    done = subprocess.run([sys.executable, "infer.py", "--workdir", str(REPO), *args], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
        done.stderr
    )
