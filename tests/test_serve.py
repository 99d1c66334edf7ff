"""serve.py's server over real HTTP on loopback: the official `openai` client (completions and chat,
streamed and not; the model list), Megatron's PUT /api from a plain HTTP client, greedy text equal to scripts/generate.py's
and to `transformers`' generate, seeded sampling, log-probabilities, stop strings, concurrent
clients, bad requests answered with a 400 and a reason, and a busy port refused before loading."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import check_ok, expect_one_line_error, run_in_process

from llama_recipe.distributed import free_port
from llama_recipe.generation import Sampling
from llama_recipe.server import load_server, wait_until_healthy

PROMPT = "The adventure began when"


@pytest.fixture(scope="module")
def server(pretrained_dir):
    """serve.py's app on uvicorn in a thread, on a free loopback port."""
    import uvicorn

    app = load_server(str(pretrained_dir), max_tokens_cap=64)
    port = free_port()
    config = uvicorn.Config(app.app, host="127.0.0.1", port=port, log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, timeout=10)
    yield app, url
    running.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[1]}/v1", api_key="not-needed", max_retries=0)


def test_greedy_completion_equals_generate_py_and_transformers(server, client, pretrained_dir):
    app, _ = server
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    text = reply.choices[0].text
    assert reply.object == "text_completion" and reply.usage.completion_tokens == 12
    assert reply.choices[0].finish_reason == "length"
    script = run_in_process("scripts/generate.py", [str(pretrained_dir), PROMPT, "--max_new_tokens", "12"])
    check_ok(script)
    assert script.stdout.split("--- answer:\n", 1)[1].strip() == text.strip()
    tok, model = app.generator.tokenizer, app.generator.model
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        hf = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)[0]
    ours = app.generator.complete(PROMPT, Sampling(max_new_tokens=12)).steps
    assert [s.token_id for s in ours] == hf[ids["input_ids"].shape[1] :].tolist()


def test_streamed_completion_is_the_same_text(client):
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, stream=True))
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sampling_is_seeded_and_logprobs_are_the_models(server, client):
    app, _ = server
    kwargs = dict(model="tiny", prompt=[PROMPT, "Holmes said"], max_tokens=8, temperature=0.9, top_p=0.9)
    first = client.completions.create(seed=7, **kwargs)
    again = client.completions.create(seed=7, **kwargs)
    other = client.completions.create(seed=8, **kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices] != [c.text for c in other.choices]
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True)
    lp = reply.choices[0].logprobs
    assert reply.choices[0].text.startswith(PROMPT) and lp.token_logprobs[0] is None
    ids = app.generator.encode(PROMPT)
    generated = app.generator.tokenizer.convert_tokens_to_ids(lp.tokens[len(ids) :])
    with torch.no_grad():  # the same numbers from one plain forward over prompt + completion
        logits = app.generator.model(input_ids=torch.tensor([ids + generated])).logits[0].float()
    expected = logits.log_softmax(-1)[torch.arange(len(ids) - 1, len(ids) + 3), torch.tensor(generated)]
    assert lp.token_logprobs[len(ids) :] == pytest.approx(expected.tolist(), abs=1e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs[len(ids) :])


def test_stop_strings_end_the_text(client):
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = whole.strip().split()[2]  # a word in the middle of the greedy text
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == whole[: whole.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_models_list_names_the_served_model(server, client, pretrained_dir):
    assert [m.id for m in client.models.list()] == [str(pretrained_dir)]


def test_chat_is_the_prompt_format_finetuning_trains_on(client):
    """A user's message is a finetuning prompt (BOS + prompt), so greedy chat continues it as a
    completion does; a system message goes before it in the same prompt, after a blank line."""
    alone = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == alone and chat.usage.completion_tokens == 12
    system = "Answer briefly."
    joined = client.completions.create(model="tiny", prompt=f"{system}\n\n{PROMPT}", max_tokens=12, temperature=0)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    with_system = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert with_system.choices[0].message.content == joined.choices[0].text != alone


def test_streamed_chat_is_the_same_text(client):
    earlier = [{"role": "user", "content": "Holmes said"}, {"role": "assistant", "content": "Watson!"}]
    messages = [*earlier, {"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"


def test_a_busy_port_is_refused_before_the_model_loads(pretrained_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = run_in_process("serve.py", [str(pretrained_dir), "--port", port])
    expect_one_line_error(proc, f"127.0.0.1:{port}", "--port")
    assert proc.stdout == ""  # no "serving on" line


def test_megatron_api_greedy_and_logprobs(server, client):
    _, url = server
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    reply = httpx.put(f"{url}/api", json={"prompts": [PROMPT], "tokens_to_generate": 6, "top_k": 1, "logprobs": True})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["text"] == [PROMPT + whole]
    assert len(body["logprobs"][0]) == len(body["segments"][0]) - 1  # every token after the first
    scored = httpx.put(f"{url}/api", json={"prompts": [PROMPT], "tokens_to_generate": 0, "logprobs": True}).json()
    assert scored["text"] == [PROMPT] and scored["logprobs"][0] == pytest.approx(
        body["logprobs"][0][: len(scored["logprobs"][0])], abs=1e-5
    )


def test_concurrent_clients_get_their_own_answers(server):
    _, url = server
    prompts = [f"{PROMPT} {word}" for word in ("a", "the", "Holmes", "Watson", "London", "night", "door", "letter")]

    def ask(prompt):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0}, timeout=60)
        return r.status_code, r.json()["choices"][0]["text"]

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone and all(code == 200 for code, _ in alone)


BAD_REQUESTS = [
    ("post", "/v1/completions", b"{not json", "JSON object"),
    ("post", "/v1/completions", {"max_tokens": 4}, "prompt: Field required"),
    ("post", "/v1/completions", {"prompt": 42}, "prompt"),
    ("post", "/v1/completions", {"prompt": []}, "at least one prompt"),
    ("post", "/v1/completions", {"prompt": ["x"] * 129}, "at most 128 prompts"),
    ("post", "/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("post", "/v1/completions", {"prompt": "x", "max_tokens": 65}, "at most 64"),
    ("post", "/v1/completions", {"prompt": "x " * 1020, "max_tokens": 8}, "exceed the model's 1024 positions"),
    ("post", "/v1/completions", {"prompt": "x", "temperature": -0.5}, "temperature"),
    ("post", "/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("post", "/v1/completions", {"prompt": "x", "top_k": -3}, "top_k"),
    ("post", "/v1/completions", {"prompt": "x", "n": 2}, "n:"),
    ("post", "/v1/completions", {"prompt": "x", "logprobs": 9}, "logprobs"),
    ("post", "/v1/completions", {"prompt": "x", "best_of": 3}, "best_of: not supported"),
    ("post", "/v1/chat/completions", {"messages": []}, "messages: List should have at least 1 item"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content: Field required"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, "the user's"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 65}, "at most 64"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs:"),
    ("put", "/api", {"prompts": "not a list"}, "prompts"),
    ("put", "/api", {"prompts": ["x"], "top_k": 5, "top_p": 0.5}, "both top_k and top_p"),
    ("put", "/api", {"prompts": ["x"], "tokens_to_generate": 0}, "set logprobs"),
    ("put", "/api", {"prompts": ["x"], "temperature": 0}, "temperature"),
]


@pytest.mark.parametrize("method, path, body, reason", BAD_REQUESTS, ids=[r[3] for r in BAD_REQUESTS])
def test_bad_requests_are_400_with_a_reason(server, method, path, body, reason):
    _, url = server
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    reply = httpx.request(method.upper(), f"{url}{path}", **kwargs)
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert reason in message and "\n" not in message


def test_the_openai_client_sees_the_reason(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="at most 64"):
        client.completions.create(model="tiny", prompt="x", max_tokens=100)
