"""OpenAI request shapes (the subset the server implements) and their checks.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send `user`, ...). Fields the
server knows but does not implement (suffix, penalties, tools, ...) are rejected with a 400 rather
than silently giving different results.

Every field that sizes work is bounded here (docs/security.md lists the limits): a request must
never make the shared engine thread do unbounded work or fail for others.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kubetune.trainer.serve.errors import ServeError, invalid_request

# Request limits (docs/security.md). Generous for real clients, small enough that no single request
# can hold the engine thread or the memory of the server.
MAX_N = 16  # choices per request (OpenAI allows 128; each one is a running sequence here)
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string
MAX_PROMPTS = 64  # prompts in one completion request
MAX_MESSAGES = 1024  # chat messages
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
MAX_SEED = 2**63  # seeds are in [0, 2**63): torch generators take signed 64-bit seeds
MAX_JSON_DEPTH = 32  # nesting of the request body
MAX_LOGPROBS = 20  # alternatives per token (OpenAI: 5 for completions, 20 for chat)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str = Field(max_length=256)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(default=None, ge=0, lt=MAX_SEED)
    # Extensions vLLM also accepts (pass them with the openai client's extra_body).
    top_k: Optional[int] = Field(default=None, ge=1)
    ignore_eos: bool = False  # refused unless the server runs with --allow-ignore-eos
    # Known but not implemented: must stay at their "off" value.
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = Field(default=None, max_length=MAX_LOGIT_BIAS)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        # Many clients send `"temperature": null` etc. for "not set"; OpenAI treats it as the default.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters")
        return value

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage_in_stream(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def unsupported(self) -> dict[str, Any]:
        """Fields set to something the server does not implement -> {field: value}."""
        off = {"presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {})}
        return {name: getattr(self, name) for name, allowed in off.items() if getattr(self, name) not in allowed}


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, value):
        if isinstance(value, list) and value and not isinstance(value[0], int) and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        return value

    max_tokens: Optional[int] = Field(default=16, ge=0)  # 0: only with echo (score the prompt)
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @model_validator(mode="after")
    def _zero_tokens_only_to_echo(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 only makes sense with echo: true (scoring the prompt)")
        return self

    def unsupported(self) -> dict[str, Any]:
        found = super().unsupported()
        if self.suffix:
            found["suffix"] = self.suffix
        if self.best_of not in (None, self.n):
            found["best_of"] = self.best_of
        return found


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def as_template_message(self) -> dict[str, str]:
        """{"role", "content"} for the chat template; text parts are joined, `developer` is `system`."""
        if isinstance(self.content, list):
            content = "".join(part.text for part in self.content)
        else:
            content = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> dict[str, Any]:
        found = super().unsupported()
        if self.tools:
            found["tools"] = "..."
        return found


def check_json_shape(body: Any) -> None:
    """Refuse what breaks code further on: nesting deeper than MAX_JSON_DEPTH (recursion in
    validators) and strings with lone surrogates ("\\ud800" is valid JSON but not text: tokenizers
    raise on it)."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise invalid_request(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise invalid_request("The request has a string that is not valid Unicode (a lone surrogate).") from None
        elif isinstance(value, dict):
            stack.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def parse_request(model_cls: type[_Request], body: Any) -> _Request:
    """Validate a JSON body into `model_cls`; problems become 400s naming the field (OpenAI's `param`)."""
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    check_json_shape(body)
    try:
        request = model_cls.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise invalid_request(f"Invalid value for `{param}`: {first['msg']}.", param=param) from None
    found = request.unsupported()
    if found:
        name = next(iter(found))
        raise ServeError(f"`{name}` is not supported by this server; leave it unset.", param=name, code="unsupported")
    return request
