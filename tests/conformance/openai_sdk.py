#!/usr/bin/env python3
"""Conformance: the official OpenAI Python SDK against a running moeserve.

    MOESERVE_URL=http://127.0.0.1:8080 MOESERVE_API_KEY=... python tests/conformance/openai_sdk.py

Checks chat (plain and streamed with usage), completions, the models list, that errors
surface as the SDK's typed exceptions, structured outputs (json_object, json_schema
validated with the `jsonschema` package, `chat.completions.parse` with a pydantic model),
tools, and the Responses API (`responses.create`, `responses.stream`, function tools,
`text.format` json_schema and `responses.parse`, continuing by `previous_response_id`,
retrieve and delete, its errors).
Prints one line per check and a summary.
"""

import json
import re
import os
from typing import Literal, Optional

import jsonschema
import openai
import pydantic
from checks import check, finish

base = os.environ.get("MOESERVE_URL", "http://127.0.0.1:8080").rstrip("/") + "/v1"
client = openai.OpenAI(base_url=base, api_key=os.environ.get("MOESERVE_API_KEY", "none"), max_retries=0)


def models():
    page = client.models.list()
    ids = [m.id for m in page.data]
    assert len(ids) == 1 and page.data[0].object == "model", ids
    assert client.models.retrieve(ids[0]).id == ids[0]
    return ids[0]


model = models()


def chat():
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    c = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert c.message.role == "assistant" and c.message.content, c
    assert c.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    return repr(c.message.content)


def chat_stream():
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        d = chunk.choices[0]
        text += d.delta.content or ""
        finish = d.finish_reason or finish
    assert usage is not None and usage.completion_tokens > 0, usage
    assert finish in ("stop", "length")
    return f"{usage.completion_tokens} tokens, {text!r}"


def completion():
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
    c = r.choices[0]
    assert r.object == "text_completion" and c.text
    assert len(c.logprobs.tokens) == r.usage.completion_tokens
    return repr(c.text)


def error_is_typed():
    try:
        client.chat.completions.create(model=model, messages=[], max_tokens=4)
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "messages", e.body
    else:
        raise AssertionError("empty messages were accepted")
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as e:
        return f"400 and 404 raised as {type(e).__name__}"
    raise AssertionError("an unknown model was accepted")


def ask(response_format, stream=False, seed=5):
    args = dict(
        model=model,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=200,
        temperature=0.7,
        seed=seed,
        response_format=response_format,
    )
    if not stream:
        c = client.chat.completions.create(**args).choices[0]
        return c.message.content, c.finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **args):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


SCHEMAS = {
    "nested object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "array with bounds": {
        "type": "object",
        "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 2, "maxItems": 4}},
        "required": ["scores"],
        "additionalProperties": False,
    },
    "enum and anyOf with null": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "nickname": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]},
        },
        "required": ["color", "nickname"],
        "additionalProperties": False,
    },
    "$ref": {
        "type": "object",
        "properties": {"home": {"$ref": "#/$defs/place"}, "work": {"$ref": "#/$defs/place"}},
        "required": ["home", "work"],
        "additionalProperties": False,
        "$defs": {"place": {"type": "object", "properties": {"floor": {"type": "integer", "minimum": 0, "maximum": 50}},
                            "required": ["floor"], "additionalProperties": False}},
    },
}


def json_schemas():
    done = []
    for name, schema in SCHEMAS.items():
        fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
        text, finish = ask(fmt)
        assert finish == "stop", (name, finish, text)
        jsonschema.validate(json.loads(text), schema)
        streamed, _ = ask(fmt, stream=True)
        assert streamed == text, (name, streamed, text)
        done.append(name)
    return ", ".join(done) + ": valid, streamed == non-streamed"


def json_object():
    text, finish = ask({"type": "json_object"}, seed=1)
    if finish == "stop":
        assert isinstance(json.loads(text), dict), text
    else:
        assert text.startswith("{"), text
    return f"{finish}: {text[:60]!r}"


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=16)
    age: int = pydantic.Field(ge=0, le=120)
    role: Literal["admin", "user"]
    manager: Optional[str] = pydantic.Field(max_length=16)


def parse():
    r = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Invent a user of a web site."}],
        response_format=Person,
        max_tokens=200,
        temperature=0,
    )
    p = r.choices[0].message.parsed
    assert isinstance(p, Person), r
    return repr(p)


def bad_schema_is_400():
    try:
        ask({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
    except openai.BadRequestError as e:
        assert e.body["param"] == "response_format.json_schema.schema", e.body
        return e.body["message"][:80]
    raise AssertionError("an invalid schema was accepted")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]},
        },
    },
]
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]


def call_tools(tool_choice, stream=False, **extra):
    args = dict(model=model, messages=WEATHER_Q, tools=TOOLS, tool_choice=tool_choice, max_tokens=120, temperature=0, **extra)
    if not stream:
        return client.chat.completions.create(**args).choices[0]
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **args):
        for d in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            c = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            c["arguments"] += d.function.arguments or ""
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return calls, finish


def check_call(call):
    tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    assert call.id.startswith("call_") and call.type == "function", call


def tool_required():
    c = call_tools("required", parallel_tool_calls=False)
    assert c.finish_reason == "tool_calls" and c.message.content is None, c
    assert len(c.message.tool_calls) == 1, c.message.tool_calls
    check_call(c.message.tool_calls[0])
    return f"{c.message.tool_calls[0].function.name}({c.message.tool_calls[0].function.arguments})"


def tool_named():
    choice = {"type": "function", "function": {"name": "get_time"}}
    c = call_tools(choice)
    assert c.finish_reason == "tool_calls", c
    call = c.message.tool_calls[0]
    assert call.function.name == "get_time", call
    check_call(call)
    calls, finish = call_tools(choice, stream=True)
    assert finish == "tool_calls" and calls[0]["name"] == "get_time", (calls, finish)
    assert calls[0]["arguments"] == call.function.arguments, (calls, call)
    return f"{call.function.arguments}, streamed pieces add up to the same"


def tool_none():
    c = call_tools("none")
    assert not c.message.tool_calls and c.finish_reason != "tool_calls", c
    return repr(c.message.content[:40])


def tool_round_trip():
    first = call_tools({"type": "function", "function": {"name": "get_weather"}})
    call = first.message.tool_calls[0]
    r = client.chat.completions.create(
        model=model,
        messages=WEATHER_Q
        + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})},
        ],
        tools=TOOLS,
        max_tokens=40,
        temperature=0,
    )
    c = r.choices[0]
    assert c.message.content or c.message.tool_calls, c
    return repr((c.message.content or "")[:60])


def tool_errors():
    try:
        call_tools({"type": "function", "function": {"name": "no_such_tool"}})
    except openai.BadRequestError as e:
        assert e.body["param"] == "tool_choice", e.body
        return e.body["message"]
    raise AssertionError("an unknown function was accepted")


# The Responses API.
RESP_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]


def responses_create():
    args = dict(model=model, input="What is the capital of France?", instructions="Be brief.", max_output_tokens=24, temperature=0)
    r = client.responses.create(**args)
    assert r.object == "response" and r.id.startswith("resp_"), r
    assert r.status in ("completed", "incomplete"), r.status
    assert r.status != "incomplete" or r.incomplete_details.reason == "max_output_tokens", r
    assert r.output[0].type == "message" and r.output[0].role == "assistant", r.output
    assert r.output_text and r.output_text == r.output[0].content[0].text, r
    u = r.usage
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.output_tokens > 0, u
    # Streamed: the documented sequence, numbered; the deltas add up to the final text,
    # which equals the non-streamed one (greedy).
    types, seqs, text = [], [], ""
    with client.responses.stream(**args) as stream:
        for event in stream:
            types.append(event.type)
            seqs.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                text += event.delta
        final = stream.get_final_response()
    assert seqs == list(range(len(seqs))), seqs
    want = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert types[:4] == want, types
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", f"response.{r.status}"], types
    assert text == final.output_text == r.output_text, (text, final.output_text, r.output_text)
    return repr(r.output_text)


def responses_tools():
    r = client.responses.create(model=model, input="What is the weather in Paris?", tools=RESP_TOOLS, tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=120, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and r.status == "completed", r.output
    call = calls[0]
    tool = next(t for t in RESP_TOOLS if t["name"] == call.name)
    jsonschema.validate(json.loads(call.arguments), tool["parameters"])
    assert call.call_id.startswith("call_"), call
    # Streamed, the argument pieces add up to the same call.
    pieces, done = "", None
    with client.responses.stream(model=model, input="What is the weather in Paris?", tools=RESP_TOOLS, tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=120, temperature=0) as stream:
        for event in stream:
            if event.type == "response.function_call_arguments.delta":
                pieces += event.delta
            elif event.type == "response.function_call_arguments.done":
                done = event.arguments
    assert pieces == done == call.arguments, (pieces, done, call.arguments)
    # The result goes back by call_id, continuing the stored conversation.
    r2 = client.responses.create(model=model, previous_response_id=r.id, tools=RESP_TOOLS, max_output_tokens=30, temperature=0,
                                 input=[{"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"sky": "clear"})}])
    assert r2.previous_response_id == r.id and r2.output, r2
    assert r2.usage.input_tokens > r.usage.input_tokens, (r.usage, r2.usage)
    return f"{call.name}({call.arguments}), then {r2.output[0].type}"


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    population: int = pydantic.Field(ge=0, le=100000000)


def responses_json_schema():
    schema = City.model_json_schema() | {"additionalProperties": False}
    r = client.responses.create(model=model, input="Describe a city as JSON.", max_output_tokens=80, temperature=0,
                                text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    parsed = client.responses.parse(model=model, input="Describe a city.", max_output_tokens=80, temperature=0, text_format=City)
    assert isinstance(parsed.output_parsed, City), parsed
    return f"{r.output_text}; parse: {parsed.output_parsed!r}"


def responses_continue_retrieve_delete():
    r1 = client.responses.create(model=model, input="My name is Ada.", max_output_tokens=8, temperature=0)
    r2 = client.responses.create(model=model, previous_response_id=r1.id, input="What is my name?", max_output_tokens=8, temperature=0)
    assert r2.previous_response_id == r1.id, r2
    # The earlier turn is in the prompt: more input than the question alone.
    alone = client.responses.create(model=model, input="What is my name?", max_output_tokens=8, temperature=0)
    assert r2.usage.input_tokens > alone.usage.input_tokens, (r2.usage, alone.usage)
    assert client.responses.retrieve(r1.id).output_text == r1.output_text
    client.responses.delete(r1.id)
    try:
        client.responses.retrieve(r1.id)
        raise AssertionError("a deleted response was returned")
    except openai.NotFoundError:
        pass
    unstored = client.responses.create(model=model, input="Hi", max_output_tokens=4, store=False)
    assert unstored.store is False
    try:
        client.responses.create(model=model, previous_response_id=unstored.id, input="Again", max_output_tokens=4)
        raise AssertionError("store: false kept the response")
    except openai.NotFoundError as e:
        assert e.body["code"] == "previous_response_not_found", e.body
    return f"{r2.usage.input_tokens} input tokens with the earlier turn, {alone.usage.input_tokens} without"


PATCH_GRAMMAR = 'start: "*** Begin Patch\\n" "*** Delete File: " NAME LF "*** End Patch"\nNAME: /[a-z]{1,8}\\.txt/\n%import common.LF'


def responses_custom_tool():
    tools = [{"type": "custom", "name": "apply_patch", "description": "Edits files.",
              "format": {"type": "grammar", "syntax": "lark", "definition": PATCH_GRAMMAR}}]
    args = dict(model=model, input="Delete notes.txt", tools=tools, tool_choice={"type": "custom", "name": "apply_patch"},
                max_output_tokens=120, temperature=0, store=False)
    r = client.responses.create(**args)
    calls = [o for o in r.output if o.type == "custom_tool_call"]
    assert len(calls) == 1 and r.status == "completed", r.output
    assert re.fullmatch(r"\*\*\* Begin Patch\n\*\*\* Delete File: [a-z]{1,8}\.txt\n\*\*\* End Patch", calls[0].input), calls[0].input
    pieces, done = "", None
    with client.responses.stream(**args) as stream:
        for event in stream:
            if event.type == "response.custom_tool_call_input.delta":
                pieces += event.delta
            elif event.type == "response.custom_tool_call_input.done":
                done = event.input
    assert pieces == done == calls[0].input, (pieces, done, calls[0].input)
    # Chat's custom tools: a regex.
    c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Rate Paris."}], tool_choice="required",
                                       tools=[{"type": "custom", "custom": {"name": "rate", "format": {"type": "grammar", "grammar": {
                                           "syntax": "regex", "definition": "(good|bad), [1-5] stars"}}}}], max_tokens=40, temperature=0)
    call = c.choices[0].message.tool_calls[0]
    assert call.type == "custom" and re.fullmatch("(good|bad), [1-5] stars", call.custom.input), call
    return f"{calls[0].input!r}; chat: {call.custom.input!r}"


def responses_errors():
    seen = []
    for args, error, param in [
        (dict(tools=[{"type": "telepathy"}]), openai.BadRequestError, "tools[0].type"),
        (dict(background=True), openai.BadRequestError, "background"),
        (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]), openai.BadRequestError, "input[0].content[0].type"),
        (dict(model="no-such-model"), openai.NotFoundError, "model"),
    ]:
        try:
            client.responses.create(**({"model": model, "input": "x", "max_output_tokens": 4} | args))
            raise AssertionError(f"{args} was accepted")
        except error as e:
            assert e.body["param"] == param, e.body
            seen.append(param)
    return ", ".join(seen)


check("models.list/retrieve", lambda: model)
check("chat.completions.create", chat)
check("chat.completions.create(stream=True, include_usage)", chat_stream)
check("completions.create(logprobs=2)", completion)
check("errors", error_is_typed)
check("response_format json_schema", json_schemas)
check("response_format json_object", json_object)
check("chat.completions.parse(pydantic)", parse)
check("invalid schema", bad_schema_is_400)
check("tools, tool_choice=required", tool_required)
check("tools, tool_choice=named, streamed", tool_named)
check("tools, tool_choice=none", tool_none)
check("tool result round trip", tool_round_trip)
check("tool errors", tool_errors)
check("responses.create, responses.stream", responses_create)
check("responses: function tools, streamed, result by previous_response_id", responses_tools)
check("responses: text.format json_schema, responses.parse", responses_json_schema)
check("responses: previous_response_id, retrieve, delete, store=false", responses_continue_retrieve_delete)
check("responses and chat: custom tools (Lark, regex), streamed", responses_custom_tool)
check("responses: errors", responses_errors)
finish()
