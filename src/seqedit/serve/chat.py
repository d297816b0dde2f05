"""OpenAI ``/v1/chat/completions`` on the live edited model: the messages are rendered by the served
tokenizer's own chat template (assistant turn opened), then generated like a completion, under the
same weights' read lock. Plain JSON, or server-sent ``chat.completion.chunk`` events with
``stream=true``. ``stop``, ``n``, ``logprobs``/``top_logprobs`` are implemented; any other field is
refused by name (``echo`` too: the chat API has none)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterator

from fastapi import APIRouter, Request

from .errors import ApiError
from .generate import TokenLogprob
from .openai_common import check_common, check_context, generate_choices, served, sse
from .routes import ERRORS, READ
from .schemas import ChatIn, ChatMessage, ChatOut

__all__ = ["chat_prompt_ids", "router"]

router = APIRouter(prefix="/v1", responses=ERRORS)


def _text(m: ChatMessage) -> str:
    return m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """Token ids of ``messages`` as the tokenizer's chat template renders them, the assistant's turn
    opened (the template writes its own special tokens; none are added)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "unsupported", "messages: the served model's tokenizer has no chat template "
                                           "(use /v1/completions)")
    convo = [{"role": m.role, "content": _text(m)} for m in messages]
    try:
        rendered = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template may refuse a conversation (roles out of order, ...)
        raise ApiError(400, "invalid_request", f"messages: the chat template refused them ({e})") from None
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def _chat_logprobs(tokens: tuple[TokenLogprob, ...]) -> dict[str, list]:
    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(a, v) for a, v in t.top]}
                        for t in tokens]}


@router.post("/chat/completions", response_model=ChatOut, dependencies=[READ],
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or with stream=true "
                                          "server-sent events of chat.completion.chunk objects ending with [DONE]"}})
def chat_completions(body: ChatIn, request: Request) -> Any:
    """OpenAI chat completions through the chat template, on the live edited weights (never mid-step)."""
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise ApiError(400, "invalid_request", "max_tokens and max_completion_tokens disagree: give one")
    max_tokens = body.max_completion_tokens or body.max_tokens or 16
    stops = check_common(body, request, max_tokens)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "invalid_request", "top_logprobs: needs logprobs=true")
    if body.stream and body.logprobs:
        raise ApiError(400, "unsupported", "logprobs: not supported with stream=true (ask without streaming)")
    worker = served(request)
    lm = worker.loaded
    encoded = [chat_prompt_ids(lm.tokenizer, body.messages)]
    check_context(lm, encoded, max_tokens, what="messages")
    head = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": request.app.state.model_id}
    if body.stream:
        chunk = {**head, "object": "chat.completion.chunk"}

        def first(k: int) -> Iterator[dict]:
            yield {**chunk, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]}

        def piece(k: int, text: str, finish: str | None) -> dict:
            return {**chunk, "choices": [{"index": k, "delta": {"content": text} if text else {},
                                          "logprobs": None, "finish_reason": finish}]}

        return sse(worker, encoded, body, stops, max_tokens, first, piece)
    results, _ = generate_choices(worker, encoded, body, stops, max_tokens,
                                  (body.top_logprobs or 0) if body.logprobs else None)
    choices = [{"index": k, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                "logprobs": None if c.logprobs is None else _chat_logprobs(c.logprobs)}
               for k, (_, c) in enumerate(results)]
    used = sum(c.tokens for _, c in results)
    return ChatOut(**head, choices=choices, usage={"prompt_tokens": len(encoded[0]), "completion_tokens": used,
                                                   "total_tokens": len(encoded[0]) + used})
