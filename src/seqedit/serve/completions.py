"""The OpenAI text side of the ``/v1`` API: ``/v1/models`` and ``/v1/completions`` (plain JSON, or
server-sent events with ``stream=true``) on the live edited model, under the weights' read lock.
``stop``, ``n``, ``logprobs`` and ``echo`` are implemented; any other field is refused by name."""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator

from fastapi import APIRouter, Request

from .errors import ApiError
from .generate import Completion, TokenLogprob, prompt_ids
from .openai_common import check_common, check_context, generate_choices, served, sse
from .routes import ERRORS, READ
from .schemas import CompletionIn, CompletionOut, ModelList

__all__ = ["router"]

router = APIRouter(prefix="/v1", responses=ERRORS)


@router.get("/models", response_model=ModelList, dependencies=[READ])
def models(request: Request) -> ModelList:
    served(request)
    return ModelList(data=[{"id": request.app.state.model_id, "created": int(request.app.state.started)}])


def _legacy_logprobs(tokens: tuple[TokenLogprob, ...], shift: int = 0) -> dict[str, list]:
    """The ``/v1/completions`` form: parallel lists, offsets into the choice's text."""
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else dict(t.top) for t in tokens],
            "text_offset": [t.offset + shift for t in tokens]}


def _choice(index: int, prompt: str, c: Completion, echoed: tuple[TokenLogprob, ...] | None, echo: bool) -> dict:
    text = (prompt + c.text) if echo else c.text
    lps = None
    if c.logprobs is not None:
        head = _legacy_logprobs(echoed) if echo and echoed is not None else None
        tail = _legacy_logprobs(c.logprobs, len(prompt) if echo else 0)
        lps = tail if head is None else {k: head[k] + tail[k] for k in tail}
    return {"text": text, "index": index, "logprobs": lps, "finish_reason": c.finish_reason}


@router.post("/completions", response_model=CompletionOut, dependencies=[READ],
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or with stream=true "
                                          "server-sent events of CompletionOut chunks ending with [DONE]"}})
def completions(body: CompletionIn, request: Request) -> Any:
    """OpenAI ``/v1/completions`` on the live edited model; it sees the weights before or after a step, never during."""
    config = request.app.state.config
    stops = check_common(body, request, body.max_tokens)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not 1 <= len(prompts) <= config.max_prompts:
        raise ApiError(400, "invalid_request", f"prompt: give 1..{config.max_prompts} prompts, got {len(prompts)}")
    if any(not isinstance(p, str) or len(p) > 8000 for p in prompts):
        raise ApiError(400, "invalid_request", "prompt: each prompt must be a string of at most 8000 characters")
    if body.max_tokens == 0 and not (body.echo and not body.stream):
        raise ApiError(400, "invalid_request", "max_tokens: 0 is only allowed with echo=true and without stream")
    if body.stream and body.logprobs is not None:
        raise ApiError(400, "unsupported", "logprobs: not supported with stream=true (ask without streaming)")
    worker = served(request)
    lm = worker.loaded
    encoded = [prompt_ids(lm, p) for p in prompts]
    check_context(lm, encoded, body.max_tokens)
    head = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
            "model": request.app.state.model_id}
    if body.stream:
        def first(k: int) -> Iterator[dict]:
            if body.echo:
                yield {**head, "choices": [{"text": prompts[k // body.n], "index": k, "logprobs": None,
                                            "finish_reason": None}]}

        return sse(worker, encoded, body, stops, body.max_tokens, first, lambda k, text, finish: {
            **head, "choices": [{"text": text, "index": k, "logprobs": None, "finish_reason": finish}]})
    results, echoed = generate_choices(worker, encoded, body, stops, body.max_tokens, body.logprobs,
                                       score_echo=body.echo and body.logprobs is not None)
    choices = [_choice(k, prompts[i], c, echoed.get(i), body.echo) for k, (i, c) in enumerate(results)]
    used = sum(c.tokens for _, c in results)
    n_prompt = sum(len(ids) for ids in encoded)
    return CompletionOut(**head, choices=choices, usage={"prompt_tokens": n_prompt, "completion_tokens": used,
                                                         "total_tokens": n_prompt + used})
