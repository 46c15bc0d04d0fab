"""What a request's output must match, as plain data: it crosses Serve handles inside SamplingParams.

The front door builds it from `response_format` or a forced tool call; attention_service/
grammar.py compiles it against the vocabulary and masks the tokens that would break it.
No grammar library here, so building one costs nothing where no token is sampled.
"""

import msgspec


class GrammarSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # A JSON Schema's text (OpenAI's `json_object` is '{"type": "object"}'). The text is the
    # cache key of the compiled grammar, so front doors write it canonically (sorted keys).
    json_schema: str
    # Unset properties allowed only where the schema says so (OpenAI's `strict`); off, an
    # object without `additionalProperties` may carry any others.
    strict: bool = True
    # Tokens forced before the JSON: a Mistral tool call's `[TOOL_CALLS]` control token,
    # which no text can spell.
    prefix_token_ids: list[int] = []
    # The request field the grammar came from, so a schema that cannot compile is refused by name.
    param: str = "response_format"
