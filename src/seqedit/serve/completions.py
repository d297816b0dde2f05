"""The OpenAI side of the ``/v1`` API: ``/v1/models`` and ``/v1/completions`` (plain JSON, or
server-sent events with ``stream=true``) on the live edited model, under the weights' read lock."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .errors import ApiError, error_body
from .generate import complete, prompt_ids, stream_complete
from .routes import ERRORS, READ, worker_of
from .schemas import CompletionIn, CompletionOut, ModelList
from .worker import Worker

__all__ = ["router"]

log = logging.getLogger("seqedit.serve")
router = APIRouter(prefix="/v1", responses=ERRORS)


def _stream(request: Request, lm: Any, worker: Worker, encoded: list[list[int]], body: CompletionIn,
            stops: list[str]) -> StreamingResponse:
    """Server-sent events as OpenAI streams them: one ``text_completion`` chunk per piece of text, the
    choice's ``finish_reason`` on its last chunk, then ``data: [DONE]``. An error after the first byte
    (the status is sent) becomes an ``error`` event."""
    head = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
            "model": request.app.state.model_id}
    pieces = stream_complete(lm, encoded, worker.weights.read(), max_tokens=body.max_tokens,
                             temperature=body.temperature, top_p=body.top_p, n=body.n, stops=stops, seed=body.seed)

    def events() -> Iterator[str]:
        try:
            for k, text, finish in pieces:
                choice = {"text": text, "index": k, "logprobs": None, "finish_reason": finish}
                yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        except Exception as e:
            log.error("streamed completion failed", exc_info=e, extra={"event": "stream_error"})
            yield f"data: {json.dumps(error_body('internal', 'generation failed (see the server log)'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _served(request: Request) -> Any:
    worker = worker_of(request)
    if not worker.ready or worker.loaded is None:
        raise ApiError(503, "unavailable", f"the model is not ready ({worker.status})")
    return worker


@router.get("/models", response_model=ModelList, dependencies=[READ])
def models(request: Request) -> ModelList:
    _served(request)
    return ModelList(data=[{"id": request.app.state.model_id, "created": int(request.app.state.started)}])


@router.post("/completions", response_model=CompletionOut, dependencies=[READ],
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or with stream=true "
                                          "server-sent events of CompletionOut chunks ending with [DONE]"}})
def completions(body: CompletionIn, request: Request) -> Any:
    """OpenAI ``/v1/completions`` on the live edited model; it sees the weights before or after a step, never during."""
    config = request.app.state.config
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not 1 <= len(prompts) <= config.max_prompts:
        raise ApiError(400, "invalid_request", f"prompt: give 1..{config.max_prompts} prompts, got {len(prompts)}")
    if any(not isinstance(p, str) or len(p) > 8000 for p in prompts):
        raise ApiError(400, "invalid_request", "prompt: each prompt must be a string of at most 8000 characters")
    if body.max_tokens > config.max_tokens:
        raise ApiError(400, "invalid_request", f"max_tokens: at most {config.max_tokens}, got {body.max_tokens}")
    if body.n > config.max_n:
        raise ApiError(400, "invalid_request", f"n: at most {config.max_n}, got {body.n}")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(len(s) > 200 for s in stops):
        raise ApiError(400, "invalid_request", "stop: at most 4 strings of at most 200 characters")
    worker = _served(request)
    lm = worker.loaded
    limit = int(getattr(lm.model.config, "max_position_embeddings", 2048) or 2048)
    encoded = [prompt_ids(lm, p) for p in prompts]
    for i, ids in enumerate(encoded):
        if len(ids) + body.max_tokens > limit:
            raise ApiError(400, "invalid_request",
                           f"prompt[{i}]: {len(ids)} tokens + max_tokens {body.max_tokens} exceed the context of {limit}")
    if body.stream:
        return _stream(request, lm, worker, encoded, body, stops)
    choices, used = [], 0
    with worker.weights.read():
        for i, ids in enumerate(encoded):
            for j, c in enumerate(complete(lm, ids, max_tokens=body.max_tokens, temperature=body.temperature,
                                           top_p=body.top_p, n=body.n, stops=stops, seed=body.seed)):
                choices.append({"text": c.text, "index": i * body.n + j, "finish_reason": c.finish_reason})
                used += c.tokens
    n_prompt = sum(len(ids) for ids in encoded)
    return CompletionOut(id="cmpl-" + uuid.uuid4().hex, created=int(time.time()), model=request.app.state.model_id,
                         choices=choices, usage={"prompt_tokens": n_prompt, "completion_tokens": used,
                                                 "total_tokens": n_prompt + used})
