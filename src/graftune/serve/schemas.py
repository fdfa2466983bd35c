"""Request and response bodies. The request models do the validation (types, counts, lengths), so a route
function receives only well-formed input and an oversized or malformed request never reaches the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from graftune.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    """Args:
    max_inputs: texts per request.
    max_chars: characters per text (the tokenizer truncates to the run's max_length anyway; this bounds the work
        and memory a request can ask for before that).
    max_body_bytes: bytes per request body, checked before the body is parsed.
    max_new_tokens: the most /v1/generate may ask for.
    """

    max_inputs: int = 64
    max_chars: int = 20_000
    max_body_bytes: int = 2_000_000
    max_new_tokens: int = 256

    def __post_init__(self):
        # a limit of 0 would refuse every request, a negative one breaks the request models: refuse at start-up
        for name, what in (("max_inputs", "texts per request"), ("max_chars", "characters per text"),
                           ("max_body_bytes", "bytes per request body"), ("max_new_tokens", "new tokens")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: got {value!r}; use a whole number of {what} from 1")


def request_models(limits: Limits) -> tuple[type[BaseModel], type[BaseModel]]:
    """``(PredictRequest, GenerateRequest)`` with these limits built into their fields."""
    Name = Annotated[StrictStr, Field(min_length=1, max_length=200)]
    Text = Annotated[StrictStr, Field(max_length=limits.max_chars)]
    Inputs = Annotated[list[Text], Field(min_length=1, max_length=limits.max_inputs)]

    class PredictRequest(BaseModel):
        """``{"adapter": NAME, "inputs": [TEXT, ...]}``"""

        model_config = ConfigDict(extra="forbid")
        adapter: Name
        inputs: Inputs

        @field_validator("inputs")
        @classmethod
        def _not_blank(cls, v: list[str]) -> list[str]:
            for i, text in enumerate(v):
                if not text.strip():
                    raise ValueError(f"inputs[{i}] is empty; send non-blank texts")
            return v

    class GenerateRequest(PredictRequest):
        """``{"adapter": NAME, "inputs": [PROMPT, ...], "max_new_tokens": N}``"""

        # strict: true and "5" are not numbers of tokens
        max_new_tokens: Annotated[StrictInt, Field(ge=1, le=limits.max_new_tokens)] | None = None

    return PredictRequest, GenerateRequest


class Prediction(BaseModel):
    label: str | None = None
    labels: list[str] | None = None
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    adapter: str
    version: str
    predictions: list[Prediction]


class GenerateResponse(BaseModel):
    adapter: str
    version: str
    outputs: list[str]


class AdapterInfo(BaseModel):
    name: str
    version: str
    kind: str
    method: str
    labels: list[str]
    base: str


class AdaptersResponse(BaseModel):
    adapters: list[AdapterInfo]


class Health(BaseModel):
    status: str
    adapters: int
    bases: int


class ErrorBody(BaseModel):
    error: str
