"""What ``/v1/completions`` and ``/v1/chat/completions`` share: the checks of a request (limits, stop
strings, fields this server does not implement answered 400 by name), generating the choices under
the weights' read lock, and the server-sent events of a streamed answer."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from .errors import ApiError, error_body
from .generate import GREEDY_BELOW, Completion, TokenLogprob, complete, score_prompt, stream_complete
from .routes import worker_of
from .schemas import _Sampling

__all__ = ["check_common", "check_context", "generate_choices", "served", "sse"]

log = logging.getLogger("seqedit.serve")

# OpenAI fields whose value here changes nothing: accepted at that value, refused (400) at any other.
_NEUTRAL: dict[str, Any] = {"presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "logit_bias": {},
                            "suffix": "", "parallel_tool_calls": False, "tools": [], "tool_choice": "none"}


def served(request: Request) -> Any:
    """The worker, once its model is loaded and the ledger verified (503 before)."""
    worker = worker_of(request)
    if not worker.ready or worker.loaded is None:
        raise ApiError(503, "unavailable", f"the model is not ready ({worker.status})")
    return worker


def check_common(body: _Sampling, request: Request, max_tokens: int) -> list[str]:
    """Refuse (400, naming the field) what is not implemented or over the limits; returns the stop strings."""
    for name, value in (body.model_extra or {}).items():
        if value is None or (name in _NEUTRAL and value == _NEUTRAL[name]):
            continue  # null means the default; a neutral value asks for nothing
        raise ApiError(400, "unsupported", f"{name}: not supported by this server (remove the field)")
    config = request.app.state.config
    if max_tokens > config.max_tokens:
        raise ApiError(400, "invalid_request", f"max_tokens: at most {config.max_tokens}, got {max_tokens}")
    if body.n > config.max_n:
        raise ApiError(400, "invalid_request", f"n: at most {config.max_n}, got {body.n}")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(len(s) > 200 for s in stops):
        raise ApiError(400, "invalid_request", "stop: at most 4 strings of at most 200 characters")
    return stops


def check_context(lm: Any, encoded: list[list[int]], max_tokens: int, what: str = "prompt") -> None:
    limit = int(getattr(lm.model.config, "max_position_embeddings", 2048) or 2048)
    for i, ids in enumerate(encoded):
        if len(ids) + max_tokens > limit:
            raise ApiError(400, "invalid_request",
                           f"{what}[{i}]: {len(ids)} tokens + max_tokens {max_tokens} exceed the context of {limit}")


def generate_choices(worker: Any, encoded: list[list[int]], body: _Sampling, stops: list[str], max_tokens: int,
                     logprobs: int | None, score_echo: bool = False
                     ) -> tuple[list[tuple[int, Completion]], dict[int, tuple[TokenLogprob, ...]]]:
    """``(prompt index, completion)`` for each of the ``n`` choices of every prompt, in choice order,
    and (``score_echo``) each prompt's own token log-probabilities, all under one read lock (so one
    answer never mixes weights from before and after a step; the lock is not reentrant)."""
    out = []
    batcher = worker.batcher
    if batcher is not None and body.temperature < GREEDY_BELOW and logprobs is None and not score_echo and max_tokens:
        # greedy, nothing but text: share forward passes with concurrent requests (one lock for all prompts)
        done = batcher.complete(encoded, max_tokens, stops)
        return [(i, c) for i, c in enumerate(done) for _ in range(body.n)], {}
    with worker.weights.read():
        echoed = {i: score_prompt(worker.loaded, ids, logprobs or 0) for i, ids in enumerate(encoded)} if score_echo else {}
        for i, ids in enumerate(encoded):
            if max_tokens == 0:  # echo only: nothing is generated
                out += [(i, Completion("", "length", 0, () if logprobs is not None else None))] * body.n
                continue
            for c in complete(worker.loaded, ids, max_tokens=max_tokens, temperature=body.temperature,
                              top_p=body.top_p, n=body.n, stops=stops, seed=body.seed, logprobs=logprobs):
                out.append((i, c))
    return out, echoed


def sse(worker: Any, encoded: list[list[int]], body: _Sampling, stops: list[str], max_tokens: int,
        first: Callable[[int], Iterator[dict]], piece: Callable[[int, str, str | None], dict]) -> StreamingResponse:
    """Server-sent events: ``first(k)`` chunks for every choice ``k``, then ``piece(k, text, finish)``
    as the text is generated (``finish`` set on each choice's last), then ``data: [DONE]``. An error
    after the first byte (the status is sent) becomes an ``error`` event."""
    pieces = stream_complete(worker.loaded, encoded, worker.weights.read(), max_tokens=max_tokens,
                             temperature=body.temperature, top_p=body.top_p, n=body.n, stops=stops, seed=body.seed)

    def events() -> Iterator[str]:
        try:
            for k in range(len(encoded) * body.n):
                for chunk in first(k):
                    yield f"data: {json.dumps(chunk)}\n\n"
            for k, text, finish in pieces:
                yield f"data: {json.dumps(piece(k, text, finish))}\n\n"
        except Exception as e:
            log.error("streamed completion failed", exc_info=e, extra={"event": "stream_error"})
            yield f"data: {json.dumps(error_body('internal', 'generation failed (see the server log)'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
