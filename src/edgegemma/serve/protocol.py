"""The OpenAI wire format the server speaks: request bodies, response pieces and errors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..engine import Engine
from ..errors import (
    AdapterError,
    BackendUnavailableError,
    ContextOverflowError,
    EdgeGemmaError,
    InvalidParameterError,
)
from ..results import Result

FINISH = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "stop"}
"""OpenAI's finish_reason for each of the engine's."""


# -- errors ------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = (
            status,
            message,
            kind,
            code,
            param,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def api_error(exc: EdgeGemmaError) -> APIError:
    """The HTTP answer to an engine error: the request's fault (4xx) unless the model failed."""
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, (InvalidParameterError, BackendUnavailableError)):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, AdapterError):
        return APIError(404, str(exc), code="model_not_found", param="model")
    return APIError(500, str(exc), kind="server_error", code="engine_error")


# -- requests ----------------------------------------------------------------------------


class _Strict(BaseModel):
    # Unknown fields and wrong types are refused, as the OpenAI API does, instead of being
    # silently ignored or coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(_Strict):
    model: str
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (llama-server has the same sampling ones).
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    adapters: dict[str, float] | None = None
    """The adapter set by name and scale; with a base model name only."""

    def check_unsupported(self) -> None:
        if self.n != 1:
            raise APIError(400, "only n=1 is supported", code="invalid_value", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise APIError(
                    400,
                    f"{name} is not supported; use repeat_penalty (an extension) instead",
                    code="invalid_value",
                    param=name,
                )
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", code="invalid_value")
        if self.stream_options is not None and not self.stream:
            raise APIError(
                400, "stream_options needs stream=true", code="invalid_value", param="stream"
            )

    def options(self) -> dict[str, Any]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repeat_penalty": self.repeat_penalty,
            "seed": self.seed,
            "stop": stops,
        }


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo or self.suffix is not None or self.best_of not in (None, 1):
            raise APIError(400, "echo, suffix and best_of are not supported", code="invalid_value")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one text, one list of token ids, or several texts."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts: list[str | list[int]] = [prompt]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if self.stream and len(prompts) != 1:
            raise APIError(400, "a streamed completion takes one prompt", param="prompt")
        return prompts


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(
                400, "top_logprobs needs logprobs=true", code="invalid_value", param="logprobs"
            )

    def options(self) -> dict[str, Any]:
        options = super().options()
        if self.max_completion_tokens is not None:
            options["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            options["logprobs"] = self.top_logprobs or 0
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            options["json_schema"] = {"type": "object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(
                    400,
                    'response_format of type "json_schema" needs a json_schema object',
                    param="response_format",
                )
            options["json_schema"] = fmt.json_schema.schema_
        return options


# -- responses ---------------------------------------------------------------------------


def usage(results: Sequence[Result]) -> dict[str, int]:
    prompt = sum(r.stats.prompt_tokens for r in results)
    completion = sum(r.stats.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def timings(result: Result) -> dict[str, float]:
    """The engine's own figures for the request, under llama-server's names."""
    stats = result.stats
    return {
        "prompt_n": stats.prompt_tokens - stats.cached_tokens,
        "cache_n": stats.cached_tokens,
        "prompt_ms": stats.prefill_s * 1000,
        "prompt_per_second": stats.prefill_tps,
        "predicted_n": stats.completion_tokens,
        "predicted_ms": stats.decode_s * 1000,
        "predicted_per_second": stats.decode_tps,
        "total_ms": stats.total_s * 1000,
        "batch_n": stats.batch_size,
    }


def chat_logprobs(result: Result) -> dict[str, Any] | None:
    if result.logprobs is None:
        return None

    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    return {
        "content": [
            {
                **entry(lp.text, lp.logprob),
                "top_logprobs": [entry(t.text, t.logprob) for t in lp.top],
            }
            for lp in result.logprobs
        ]
    }


def completion_logprobs(result: Result) -> dict[str, Any] | None:
    if result.logprobs is None:
        return None
    offsets, at = [], 0
    for lp in result.logprobs:
        offsets.append(at)
        at += len(lp.text)
    return {
        "tokens": [lp.text for lp in result.logprobs],
        "token_logprobs": [_finite(lp.logprob) for lp in result.logprobs],
        "top_logprobs": [{t.text: _finite(t.logprob) for t in lp.top} for lp in result.logprobs],
        "text_offset": offsets,
    }


def _finite(value: float) -> float:
    # JSON has no -Infinity: a token the sampler ruled out gets the lowest float instead.
    return value if math.isfinite(value) else -3.4028234663852886e38


def model_card(created: int, model_id: str, **facts: Any) -> dict[str, Any]:
    """OpenAI's model object; ``facts`` add edgegemma's own (an adapter's version, sha256)."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "edgegemma",
        **facts,
    }


def fingerprint(engine: Engine) -> str:
    return f"edgegemma-{__version__}-{engine.backend_name}"
