"""Pydantic models of every request and response body (they make the OpenAPI schema at ``/openapi.json``).

Sizes are bounded here so that no request can make the service hold much memory; the semantic checks
of a fact are :class:`seqedit.Fact`'s own (the API runs them on submit).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

Text = Field(max_length=2000)
SHORT = 200


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str
    message: str
    type: str


class ErrorOut(BaseModel):
    error: ErrorDetail


class FactIn(Strict):
    """One fact, the fields of :class:`seqedit.Fact` (``prompt`` holds ``{}`` where the subject goes, or
    contains the subject)."""

    prompt: str = Field(max_length=2000)
    subject: str = Field(max_length=SHORT * 2)
    target: str = Field(max_length=SHORT * 2)
    true_target: Optional[str] = Field(None, max_length=SHORT * 2)
    paraphrases: list[str] = Field(default_factory=list, max_length=32)
    neighbors: list[tuple[str, str]] = Field(default_factory=list, max_length=32)
    generation_prompts: list[str] = Field(default_factory=list, max_length=32)
    id: Optional[str] = Field(None, max_length=SHORT, description="Fact id (default: the edit id).")
    meta: dict[str, Any] = Field(default_factory=dict, max_length=32)


class FactList(Strict):
    facts: list[FactIn] = Field(min_length=1)


def _edits_kind(value: Any) -> str:
    return "list" if isinstance(value, dict) and "facts" in value else "fact"


# one fact, or {"facts": [...]}; the discriminator keeps error messages about the form that was meant
EditsIn = Annotated[Union[Annotated[FactIn, Tag("fact")], Annotated[FactList, Tag("list")]], Discriminator(_edits_kind)]


class EditOut(BaseModel):
    id: str
    state: Literal["queued", "applied", "rejected"]
    fact_id: str
    step: Optional[int] = None
    reason: Optional[str] = None
    created: float
    updated: float


class EditsAccepted(BaseModel):
    edits: list[EditOut]


class EditsPage(BaseModel):
    total: int
    counts: dict[str, int]
    edits: list[EditOut]


class FactOut(BaseModel):
    id: str
    prompt: str
    subject: str
    target: str
    true_target: Optional[str] = None
    paraphrases: list[str]
    neighbors: list[list[str]]
    generation_prompts: list[str]
    meta: dict[str, Any]
    step: int = Field(description="The step that (last) put this fact in force.")


class FactsPage(BaseModel):
    total: int
    offset: int
    limit: int
    facts: list[FactOut]


class StepOut(BaseModel):
    id: int
    kind: str
    created: float
    target: Optional[int] = None
    undone_by: Optional[int] = None
    added: list[str]
    removed: list[str]


class LogOut(BaseModel):
    last_step: int
    total: int
    offset: int
    limit: int
    steps: list[StepOut]
    queue: dict[str, int]


class VerifyIn(Strict):
    tol: float = Field(1e-8, gt=0, le=1.0)


class VerifyOut(BaseModel):
    ok: bool
    tol: float
    method: str
    n_facts: int
    steps: int
    files_checked: int
    bad_files: list[list[str]]
    layers: dict[str, dict[str, Any]]
    seconds: float


class ExportIn(Strict):
    path: str = Field(min_length=1, max_length=500, description="A new directory, relative to the export root.")
    delta: bool = False
    delta_dtype: Literal["float32", "float64"] = "float32"


class ExportOut(BaseModel):
    path: str
    delta: bool
    bytes: int
    step: int


class _Sampling(BaseModel):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions``. Other fields are kept (extra
    ``allow``) only so that the route can answer 400 naming them: none is silently ignored."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = Field(None, max_length=SHORT * 2)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: Union[None, str, list[str]] = None
    stream: bool = False
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)


class JobOut(BaseModel):
    """A worker job: ``queued`` → ``running`` → ``done`` (``result``) or ``failed`` (``error`` with its
    HTTP ``status``), or ``cancelled`` (its client stopped waiting before it started; nothing was done)."""

    id: str
    what: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    created: float
    started: Optional[float] = None
    finished: Optional[float] = None
    result: Optional[dict[str, Any]] = None
    error: Optional[ErrorDetail] = None
    status: Optional[int] = None


class CompletionIn(_Sampling):
    """The OpenAI ``/v1/completions`` request. ``logprobs``: alternatives per token (0..20), ``echo``:
    the prompt is prepended to each choice (with its tokens' log-probabilities when asked);
    ``max_tokens`` 0 only scores the prompt (with ``echo``)."""

    prompt: Union[str, list[str]] = Field(max_length=8000)
    max_tokens: int = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False


class Choice(BaseModel):
    text: str
    index: int
    logprobs: Optional[dict[str, Any]] = Field(
        None, description="tokens, token_logprobs, top_logprobs, text_offset (when logprobs was asked)")
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionOut(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class TextPart(Strict):
    type: Literal["text"]
    text: str = Field(max_length=8000)


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]] = Field(max_length=8000)
    name: Optional[str] = Field(None, max_length=SHORT)


class ChatIn(_Sampling):
    """The OpenAI ``/v1/chat/completions`` request, rendered by the tokenizer's chat template.
    ``logprobs``: return each token's log-probability; ``top_logprobs``: alternatives per token (0..20)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class ChatReply(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatReply
    logprobs: Optional[dict[str, Any]] = Field(None, description='{"content": [{token, logprob, bytes, top_logprobs}]}')
    finish_reason: Literal["stop", "length"]


class ChatOut(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "seqedit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class Health(BaseModel):
    status: str
    ready: bool = True
    step: Optional[int] = None
    model: Optional[str] = None
