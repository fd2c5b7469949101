#!/usr/bin/env python3
"""Conformance: the official Anthropic Python SDK against a running moeserve's Messages API.

    MOESERVE_URL=http://127.0.0.1:8080 MOESERVE_API_KEY=... python tests/conformance/anthropic_sdk.py

Checks `messages.create` (text, stop sequences, usage), `messages.stream` (the text stream
adds up to the final message, which equals the non-streamed one), tool use (`any`, a named
tool, streamed input JSON, a `tool_result` round trip), `messages.count_tokens`, and that
errors arrive as the SDK's typed exceptions with Anthropic's error types. The SDK sends
the key as `x-api-key`, and has no `temperature` parameter: the plain create runs on the
server's defaults; the comparisons that need greedy decoding send `temperature` through
`extra_body`. Prints one line per check and a summary.
"""

import json
import os

import anthropic
import jsonschema
from checks import check, finish

url = os.environ.get("MOESERVE_URL", "http://127.0.0.1:8080").rstrip("/")
client = anthropic.Anthropic(base_url=url, api_key=os.environ.get("MOESERVE_API_KEY", "none"), max_retries=0)

# The served model's id, from the OpenAI-compatible list (the Messages API has none).
import urllib.request  # noqa: E402

req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {os.environ.get('MOESERVE_API_KEY', 'none')}"})
model = json.load(urllib.request.urlopen(req))["data"][0]["id"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# The current SDK has no `temperature` parameter (the server's defaults apply, as the
# `create` check shows); the comparisons of streamed and whole answers need greedy
# decoding, so they send it as an extra field, which the API still takes.
GREEDY = {"temperature": 0}


def create():
    m = client.messages.create(model=model, max_tokens=24, system="You are brief.", messages=QUESTION, extra_body=GREEDY)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_"), m
    assert m.content[0].type == "text" and m.content[0].text, m.content
    assert m.stop_reason in ("end_turn", "max_tokens") and m.stop_sequence is None, m
    assert m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) > 0 and m.usage.output_tokens > 0, m.usage
    # No temperature: the server's defaults apply (the SDK sends none).
    d = client.messages.create(model=model, max_tokens=8, messages=QUESTION)
    assert d.content, d
    return repr(m.content[0].text)


def stop_sequences():
    m = client.messages.create(model=model, max_tokens=40, messages=QUESTION, extra_body=GREEDY, stop_sequences=[" ", "\n"])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence in (" ", "\n"), m
    text = m.content[0].text if m.content else ""
    assert " " not in text and "\n" not in text, text
    return f"stopped at {m.stop_sequence!r} after {text!r}"


def stream():
    args = dict(model=model, max_tokens=24, system="You are brief.", messages=QUESTION, extra_body=GREEDY)
    whole = client.messages.create(**args)
    types = []
    with client.messages.stream(**args) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    with client.messages.stream(**args) as s:
        types = [e.type for e in s]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"], types
    assert "content_block_start" in types and "content_block_stop" in types, types
    assert text == final.content[0].text == whole.content[0].text, (text, final.content, whole.content)
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens, (final, whole)
    return f"{len(types)} events, {text!r}"


TOOLS = [
    {
        "name": "get_weather",
        "description": "The current weather in a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
    {
        "name": "get_time",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]},
    },
]
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]


def tool_use():
    args = dict(model=model, max_tokens=120, messages=WEATHER_Q, tools=TOOLS, extra_body=GREEDY,
                tool_choice={"type": "any", "disable_parallel_tool_use": True})
    m = client.messages.create(**args)
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and len(uses) == 1, m
    use = uses[0]
    tool = next(t for t in TOOLS if t["name"] == use.name)
    jsonschema.validate(use.input, tool["input_schema"])
    assert use.id.startswith("toolu_"), use
    # Streamed: the input JSON pieces make the same input.
    with client.messages.stream(**args) as s:
        final = s.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and streamed[0].input == use.input, (final, use)
    # The result goes back as a tool_result block.
    reply = client.messages.create(
        model=model, max_tokens=30, tools=TOOLS, extra_body=GREEDY,
        messages=WEATHER_Q + [
            {"role": "assistant", "content": [b.model_dump() for b in m.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": json.dumps({"sky": "clear"})}]},
        ],
    )
    assert reply.content and reply.stop_reason in ("end_turn", "max_tokens", "tool_use"), reply
    return f"{use.name}({json.dumps(use.input)}), then {reply.content[0].type}"


def named_tool():
    m = client.messages.create(model=model, max_tokens=120, messages=WEATHER_Q, tools=TOOLS, extra_body=GREEDY,
                               tool_choice={"type": "tool", "name": "get_time"})
    use = next(b for b in m.content if b.type == "tool_use")
    assert use.name == "get_time" and m.stop_reason == "tool_use", m
    none = client.messages.create(model=model, max_tokens=20, messages=WEATHER_Q, tools=TOOLS, tool_choice={"type": "none"})
    assert all(b.type != "tool_use" for b in none.content), none
    return json.dumps(use.input)


def count_tokens():
    n = client.messages.count_tokens(model=model, system="You are brief.", messages=QUESTION)
    m = client.messages.create(model=model, max_tokens=4, system="You are brief.", messages=QUESTION)
    used = m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)
    assert n.input_tokens == used, (n, m.usage)
    return f"{n.input_tokens} tokens"


def errors():
    seen = []
    for args, error, kind in [
        (dict(model="no-such-model"), anthropic.NotFoundError, "not_found_error"),
        (dict(messages=[]), anthropic.BadRequestError, "invalid_request_error"),
        (dict(tools=[{"name": "f"}]), anthropic.BadRequestError, "invalid_request_error"),
    ]:
        try:
            client.messages.create(**({"model": model, "max_tokens": 4, "messages": QUESTION} | args))
            raise AssertionError(f"{args} was accepted")
        except error as e:
            assert e.body["type"] == "error" and e.body["error"]["type"] == kind, e.body
            seen.append(e.body["error"]["message"][:40])
    bad_key = anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0)
    if os.environ.get("MOESERVE_API_KEY"):
        try:
            bad_key.messages.create(model=model, max_tokens=4, messages=QUESTION)
            raise AssertionError("a wrong key was accepted")
        except anthropic.AuthenticationError as e:
            assert e.body["error"]["type"] == "authentication_error", e.body
    return "; ".join(seen)


check("messages.create", create)
check("messages.create(stop_sequences)", stop_sequences)
check("messages.stream", stream)
check("tool use: any, streamed, tool_result round trip", tool_use)
check("tool use: a named tool, none", named_tool)
check("messages.count_tokens", count_tokens)
check("errors", errors)
finish()
