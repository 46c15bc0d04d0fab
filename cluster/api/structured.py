"""Structured output as the OpenAI API spells it: `response_format` and a forced `tool_choice`,
turned into the GrammarSpec the engine decodes under (attention_service/grammar.py).

    response_format {"type": "text"}                                  no grammar
                    {"type": "json_object"}                           any JSON object
                    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    tool_choice     "required" | {"type": "function", "function": {"name"}}
                    a Mistral tool call: `[TOOL_CALLS]` then [{"name", "arguments"}]

A schema that cannot compile is refused here, naming the field, before any work.
"""

from __future__ import annotations

import json
from typing import Any

from attention_service import grammar
from attention_service.errors import RequestError
from attention_service.grammar_spec import GrammarSpec
from attention_service.tokenizer import Tokenizer
from cluster.api.chat import tool_calls_token

_ANY_OBJECT = '{"type": "object"}'


def response_format_grammar(rf: dict[str, Any] | None) -> GrammarSpec | None:
    """The grammar `response_format` asks for (None for plain text); RequestError on a bad one."""
    if rf is None:
        return None
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec(_ANY_OBJECT)
    if kind != "json_schema":
        raise RequestError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           "response_format")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise RequestError("response_format.json_schema must be an object with the schema under 'schema'",
                           "response_format")
    schema = js.get("schema", {"type": "object"})
    strict = js.get("strict")
    if not isinstance(schema, (dict, bool)) or not isinstance(strict, (bool, type(None))):
        raise RequestError("response_format.json_schema.schema must be a JSON Schema object and strict a boolean",
                           "response_format")
    spec = GrammarSpec(json.dumps(schema, ensure_ascii=False), strict=bool(strict))
    grammar.check(spec)
    return spec


def tool_choice_grammar(tok: Tokenizer, tools: list[dict] | None, tool_choice: Any) -> GrammarSpec | None:
    """The grammar of a tool call `tool_choice` forces ("required" or a named function), else None."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    functions = {}
    for t in tools or []:
        f = t.get("function") if isinstance(t, dict) else None
        if isinstance(f, dict) and isinstance(f.get("name"), str):
            functions[f["name"]] = f.get("parameters") or {"type": "object"}
    if tool_choice == "required":
        if not functions:
            raise RequestError("tool_choice 'required' needs at least one function in tools", "tool_choice")
        names = list(functions)
    elif isinstance(tool_choice, dict) and isinstance((tool_choice.get("function") or {}).get("name"), str):
        name = tool_choice["function"]["name"]
        if name not in functions:
            raise RequestError(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
        names = [name]
    else:
        raise RequestError("tool_choice must be 'none', 'auto', 'required' or "
                           "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    marker = tool_calls_token(tok)
    if marker is None:
        raise RequestError(f"this model's tokenizer ({tok.version}) does not support tool calls", "tool_choice")
    calls = [{"type": "object", "properties": {"name": {"const": n}, "arguments": functions[n]},
              "required": ["name", "arguments"], "additionalProperties": False} for n in names]
    schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    spec = GrammarSpec(json.dumps(schema, ensure_ascii=False), strict=True, prefix_token_ids=[marker], param="tools")
    grammar.check(spec)
    return spec
