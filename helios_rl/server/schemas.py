"""Request and response bodies of the HTTP API (OpenAI-compatible, plus the admin endpoints).

The models are strict (no string-to-number coercion, no NaN): a wrong type is a 400 whose error
names the field, the way the OpenAI API answers. Fields OpenAI clients send that this server does
not act on are ignored when they carry their neutral value (``frequency_penalty: 0``) and rejected,
naming the field, when they ask for something it cannot do (``n: 2``, ``logprobs: 5``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1
_FLOAT = {"allow_inf_nan": False}


class ErrorDetail(BaseModel):
    """OpenAI error object: ``param`` names the offending request field (None when no one field is at fault)."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ----------------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Generation(BaseModel):
    """Fields the completion and chat endpoints share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(min_length=1, description="the served alias or one of the candidate models (/v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate (at most the server's max_model_len)")
    temperature: float | None = Field(None, ge=0.0, le=2.0, **_FLOAT)
    top_p: float | None = Field(None, gt=0.0, le=1.0, **_FLOAT)
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, **_FLOAT, description="not supported: must be 0")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, **_FLOAT, description="not supported: must be 0")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past end-of-sequence")


class CompletionRequest(_Generation):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] = Field(description="text, token ids, or a list with one text")
    echo: bool = Field(False, description="not supported: must be false")
    logprobs: int | None = Field(None, ge=0, le=0, description="not supported")
    suffix: str | None = Field(None, max_length=0, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``: the messages are rendered with the active model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")
    logprobs: bool = Field(False, description="not supported: must be false")
    top_logprobs: int | None = Field(None, ge=0, le=0)


# ----------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class HeliosInfo(BaseModel):
    """Extension field: how the request was served (models in order of use, exit layer per token)."""

    models: list[str]
    depth: int
    exit_layers: list[int]
    mean_exit_layer: float


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage
    helios: HeliosInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    helios: HeliosInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "helios-rl"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str
    depth: int
    engine_alive: bool
    outstanding: int
    reason: str | None = None  # why the engine cannot serve (None while it can)


# ----------------------------------------------------------------------------- admin
class ConfigOverride(BaseModel):
    """``POST /admin/config``: ServingConfig fields to change (omitted: keep) and whether to pin them.

    ``pin: true`` stops controller decisions from being applied until ``pin: false`` is posted, so an
    operator's override is not undone at the next control interval.
    """

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = Field(None, min_length=1)
    depth: int | None = Field(None, ge=1)
    max_batch: int | None = Field(None, ge=1)
    threshold: float | dict[str, float] | None = Field(None, description="one threshold, or {layer: threshold}")
    exit_layers: list[int] | None = None
    measure: Literal["max_prob", "margin", "entropy"] | None = None
    target: float | None = Field(None, gt=0.0, le=1.0,
                                 description="a calibrated precision target (names exit layers and thresholds); "
                                             "1.0: no early exit")
    pin: bool | None = None


class ServingConfigBody(BaseModel):
    model: str | None
    depth: int | None
    max_batch: int | None
    threshold: float | dict[str, float] | None
    exit_layers: list[int] | None
    measure: str | None
    target: float | None = None


class AdminState(BaseModel):
    """``GET /admin/config``: the config in force, the effective batch cap and who controls it."""

    config: ServingConfigBody
    effective_max_batch: int
    pinned: bool
    controller: str
    fallback: str | None
    shadow: str | None
    models: list[str]
    num_layers: dict[str, int]
