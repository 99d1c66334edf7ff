"""The generation server behind serve.py: FastAPI on uvicorn (the stack of vLLM's and SGLang's
OpenAI-compatible servers: pydantic validates every request, and streaming is a plain generator).

- `POST /v1/completions`: OpenAI's completions API (prompt or list of prompts, max_tokens,
  temperature, top_p, stop, seed, logprobs, echo, stream as server-sent events; top_k as an
  extension), so the official `openai` client and what is built on it work unchanged.
- `POST /v1/chat/completions`: OpenAI's chat API (messages, streamed or not; the same sampling
  fields), each conversation rendered as the prompt/completion examples finetune.py trains on
  (`instruct.encode_chat`); `GET /v1/models` lists the one model, as clients ask first.
- `PUT /api`: Megatron-LM's text generation server API (prompts, tokens_to_generate, temperature,
  top_k or top_p, logprobs, random_seed) and its response shape, for its text_generation_cli.py.
- `GET /health`.

Requests are served one at a time (a lock around the model): one model on one device gains
little from running two requests at once, and a lock keeps each request's seeded sampling
reproducible. Bad requests get a 400 with a one-line reason, never a 500.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .checkpoint_paths import resolve_checkpoint
from .data import load_model_tokenizer
from .generation import Completion, Generator, Sampling
from .instruct import encode_chat
from .model import (
    check_tokenizer_fits,
    get_model_config,
    inference_placement,
    load_pretrained_model,
)

MAX_PROMPTS = 128  # per request, as Megatron's server allows


def wait_until_healthy(url: str, timeout: float = 60.0) -> None:
    """Poll `url`/health until the server answers 200 (a server just started in another process or
    thread); TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # not listening yet (URLError is an OSError)
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer /health within {timeout:g} s")
        time.sleep(0.05)


class BadRequest(Exception):
    """A request we refuse, with the reason (answered as a 400)."""


class CompletionRequest(BaseModel):
    """OpenAI's completions request (the fields we honour; n, best_of, suffix... are refused if set)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # an extension, as vLLM's
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = None  # accepted and ignored, as OpenAI's clients may send it
    frequency_penalty: float = Field(0.0, ge=0, le=0)  # only the default: no penalties are implemented
    presence_penalty: float = Field(0.0, ge=0, le=0)


class TextPart(BaseModel):
    """A message's content given as parts (OpenAI's `[{"type": "text", "text": ...}]`): text only."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation; "developer" is OpenAI's newer name for "system"."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted and ignored: the training rows name no speakers

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(BaseModel):
    """OpenAI's chat completions request (the fields we honour, as CompletionRequest's; logprobs,
    tools, response_format... are refused if set). Without max_tokens, the answer runs until EOS,
    --max_tokens_cap or the model's positions, whichever comes first (OpenAI's default is no limit)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    frequency_penalty: float = Field(0.0, ge=0, le=0)
    presence_penalty: float = Field(0.0, ge=0, le=0)


class MegatronRequest(BaseModel):
    """Megatron-LM's `PUT /api` request."""

    model_config = ConfigDict(extra="forbid")
    prompts: list[str] = Field(min_length=1, max_length=MAX_PROMPTS)
    tokens_to_generate: int = Field(64, ge=0)
    logprobs: bool = False
    temperature: float = Field(1.0, gt=0, le=100)
    top_k: int = Field(0, ge=0, le=1000)
    top_p: float = Field(0.0, ge=0, le=1)
    random_seed: int | None = Field(None, ge=0)
    add_BOS: bool = True  # noqa: N815 (Megatron's spelling); LLaMA always starts with BOS


def _one_line(error: RequestValidationError) -> str:
    """The first problem of a request, in one line: the field, and what is wrong with it."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    if not where:  # the body itself
        return f"the body must be a JSON object, sent with Content-Type: application/json ({first.get('msg')})"
    if first.get("type") == "extra_forbidden":
        return f"{where}: not supported by this server"
    return f"{where}: {first.get('msg', 'invalid')}"


class CompletionServer:
    """The model, its limits and the lock; `app` is the FastAPI application."""

    def __init__(self, generator: Generator, model_name: str, max_tokens_cap: int = 1024):
        self.generator, self.model_name, self.max_tokens_cap = generator, model_name, max_tokens_cap
        self.lock = threading.Lock()
        self.created = int(time.time())  # when the model was loaded: /v1/models' "created"
        self.app = self._build_app()

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="llama_recipe generation server")

        @app.exception_handler(RequestValidationError)
        def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
            return _error(_one_line(error))

        @app.exception_handler(BadRequest)
        def refused(request: Request, error: BadRequest) -> JSONResponse:
            return _error(str(error))

        @app.get("/health")
        def health() -> dict:
            return {"status": "ok", "model": self.model_name}

        @app.post("/v1/completions")
        def completions(request: CompletionRequest):
            return self.completions(request)

        @app.get("/v1/models")
        def models() -> dict:
            card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama_recipe"}
            return {"object": "list", "data": [card]}

        @app.post("/v1/chat/completions")
        def chat(request: ChatRequest):
            return self.chat(request)

        @app.put("/api")
        def megatron(request: MegatronRequest) -> dict:
            return self.megatron(request)

        return app

    def _checked(self, prompts: list[str], max_tokens: int) -> list[list[int]]:
        """Each prompt's tokens, once the request fits the model."""
        if not prompts:
            raise BadRequest("prompt: give at least one prompt")
        if len(prompts) > MAX_PROMPTS:
            raise BadRequest(f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
        encoded = [self.generator.encode(p) for p in prompts]
        return self._fitting(encoded, max_tokens, [f"prompt {i}" for i in range(len(prompts))])

    def _fitting(self, encoded: list[list[int]], max_tokens: int, names: list[str]) -> list[list[int]]:
        """`encoded` (prompts called `names` in errors), once max_tokens is within the cap and each
        prompt with it fits the model's positions."""
        if max_tokens > self.max_tokens_cap:
            raise BadRequest(f"max_tokens: at most {self.max_tokens_cap} (serve.py --max_tokens_cap), got {max_tokens}")
        positions = self.generator.max_positions
        for name, ids in zip(names, encoded, strict=True):
            if not ids:  # (a tokenizer without BOS, and an empty prompt)
                raise BadRequest(f"{name}: empty; give some text to continue")
            if len(ids) + max_tokens > positions:
                raise BadRequest(
                    f"{name}: {len(ids)} tokens + max_tokens {max_tokens} exceed the model's {positions} positions"
                )
        return encoded

    def completions(self, r: CompletionRequest):
        prompts = [r.prompt] if isinstance(r.prompt, str) else r.prompt
        encoded = self._checked(prompts, r.max_tokens)
        stop = (r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ())
        sampling = Sampling(r.max_tokens, r.temperature, r.top_k, r.top_p, r.seed, stop, r.logprobs or 0)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": r.model or self.model_name,
        }
        if r.stream:
            return StreamingResponse(self._stream(head, prompts, encoded, sampling, r), media_type="text/event-stream")
        choices, generated = [], 0
        with self.lock:
            for index, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
                done = self.generator.complete(ids, sampling)
                generated += len(done.steps)
                choices.append(self._choice(index, prompt, ids, done, r))
        prompt_tokens = sum(len(ids) for ids in encoded)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated,
        }
        return {**head, "choices": choices, "usage": usage}

    def _choice(self, index: int, prompt: str, ids: list[int], done: Completion, r: CompletionRequest) -> dict:
        text = (prompt if r.echo else "") + done.text
        logprobs = None
        if r.logprobs is not None:
            tok = self.generator.tokenizer
            steps = done.steps
            tokens = [tok.convert_ids_to_tokens(s.token_id) for s in steps]
            values = [s.logprob for s in steps]
            tops = [{tok.convert_ids_to_tokens(i): v for i, v in s.top.items()} for s in steps]
            if r.echo:  # the prompt's tokens first (the first one has no log-probability, as OpenAI's)
                prompt_values = [None, *self.generator.prompt_logprobs(ids)] if len(ids) > 1 else [None]
                tokens = tok.convert_ids_to_tokens(ids) + tokens
                values, tops = prompt_values + values, [None] * len(ids) + tops
            logprobs = {
                "tokens": tokens,
                "token_logprobs": values,
                "top_logprobs": tops if r.logprobs else None,
                "text_offset": _offsets(tokens),
            }
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": done.finish_reason}

    def _stream(self, head, prompts, encoded, sampling, r: CompletionRequest) -> Iterator[str]:
        """Server-sent events: a chunk per piece of text (per prompt in turn), then [DONE]."""
        with self.lock:
            for index, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
                if r.echo:
                    yield _event(head, index, prompt, None)
                for text, _step, finish_reason in self.generator.stream(ids, sampling):
                    if text or finish_reason:
                        yield _event(head, index, text, finish_reason)
        yield "data: [DONE]\n\n"

    def chat(self, r: ChatRequest):
        if r.messages[-1].role == "assistant":
            raise BadRequest("messages: the last one must be the user's, for the model to answer")
        messages = [(m.role, m.text()) for m in r.messages]
        ids = encode_chat(self.generator.tokenizer, messages)
        asked = r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens
        room = self.generator.max_positions - len(ids)
        max_tokens = asked if asked is not None else max(0, min(self.max_tokens_cap, room))
        self._fitting([ids], max_tokens, ["messages"])
        stop = (r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ())
        sampling = Sampling(max_tokens, r.temperature, r.top_k, r.top_p, r.seed, stop)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": r.model or self.model_name}
        if r.stream:
            return StreamingResponse(self._chat_stream(head, ids, sampling), media_type="text/event-stream")
        with self.lock:
            done = self.generator.complete(ids, sampling)
        message = {"role": "assistant", "content": done.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}
        generated = len(done.steps)
        usage = {"prompt_tokens": len(ids), "completion_tokens": generated, "total_tokens": len(ids) + generated}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage}

    def _chat_stream(self, head: dict, ids: list[int], sampling: Sampling) -> Iterator[str]:
        """Server-sent chat chunks: the role first, then a delta per piece of text, the finish reason
        in the last one, then [DONE] (OpenAI's order)."""
        head = {**head, "object": "chat.completion.chunk"}
        yield _chat_event(head, {"role": "assistant", "content": ""}, None)
        with self.lock:
            for text, _step, finish_reason in self.generator.stream(ids, sampling):
                if text:
                    yield _chat_event(head, {"content": text}, None)
                if finish_reason:
                    yield _chat_event(head, {}, finish_reason)
        yield "data: [DONE]\n\n"

    def megatron(self, r: MegatronRequest) -> dict:
        if r.top_k and r.top_p:
            raise BadRequest("cannot set both top_k and top_p: choose one way of sampling")
        if r.tokens_to_generate == 0 and not r.logprobs:
            raise BadRequest("tokens_to_generate is 0: set logprobs to true to score the prompts, or generate tokens")
        encoded = self._checked(r.prompts, r.tokens_to_generate)
        sampling = Sampling(r.tokens_to_generate, r.temperature, r.top_k, r.top_p or 1.0, r.random_seed)
        if r.top_k == 1:  # Megatron's greedy
            sampling = Sampling(r.tokens_to_generate, 0.0, seed=r.random_seed)
        out = {"text": [], "segments": [], "logprobs": [] if r.logprobs else None}
        tok = self.generator.tokenizer
        with self.lock:
            for prompt, ids in zip(r.prompts, encoded, strict=True):
                done = self.generator.complete(ids, sampling)
                all_ids = ids + [s.token_id for s in done.steps]
                out["text"].append(prompt + done.text)
                out["segments"].append(tok.convert_ids_to_tokens(all_ids))
                if r.logprobs:  # every token after the first, prompt and generated, as Megatron's
                    generated = [s.logprob for s in done.steps]  # scored while generating
                    out["logprobs"].append(self.generator.prompt_logprobs(ids) + generated if len(all_ids) > 1 else [])
        return out


def _offsets(tokens: list[str]) -> list[int]:
    """Approximate character offsets of SentencePiece tokens ('▁' is a space)."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.replace("\u2581", " "))
    return offsets


def _event(head: dict, index: int, text: str, finish_reason: str | None) -> str:
    chunk = {**head, "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(chunk)}\n\n"


def _chat_event(head: dict, delta: dict, finish_reason: str | None) -> str:
    chunk = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(chunk)}\n\n"


def _error(message: str) -> JSONResponse:
    """OpenAI's error shape (its client shows `message`), status 400."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(status_code=400, content=body)


def load_server(model: str, tokenizer: str | None = None, max_tokens_cap: int = 1024) -> CompletionServer:
    """A server for `model` (a step-<N> checkpoint, a `latest` file, a HF directory or a hub name),
    on the first GPU in bf16 if there is one, else on the CPU in fp32."""
    model_dir = resolve_checkpoint(model, "serve.py")
    tok = load_model_tokenizer(model_dir, tokenizer)
    check_tokenizer_fits(tok, get_model_config(str(model_dir)), str(model_dir))
    weights = load_pretrained_model(model_dir, *inference_placement())
    return CompletionServer(Generator(weights, tok), str(model), max_tokens_cap)
