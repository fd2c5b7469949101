#!/usr/bin/env python3
"""Conformance: the official OpenAI Python SDK against a running moeserve.

    MOESERVE_URL=http://127.0.0.1:8080 MOESERVE_API_KEY=... python tests/conformance/openai_sdk.py

Checks chat (plain and streamed with usage), completions, the models list, and that
errors surface as the SDK's typed exceptions. Prints one line per check and a summary.
"""

import os
import sys

import openai

base = os.environ.get("MOESERVE_URL", "http://127.0.0.1:8080").rstrip("/") + "/v1"
client = openai.OpenAI(base_url=base, api_key=os.environ.get("MOESERVE_API_KEY", "none"), max_retries=0)
passed, failed = 0, 0


def check(name, fn):
    global passed, failed
    try:
        detail = fn()
        passed += 1
        print(f"ok   {name}: {detail}")
    except Exception as e:  # noqa: BLE001 - report every failure and go on
        failed += 1
        print(f"FAIL {name}: {type(e).__name__}: {e}")


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


check("models.list/retrieve", lambda: model)
check("chat.completions.create", chat)
check("chat.completions.create(stream=True, include_usage)", chat_stream)
check("completions.create(logprobs=2)", completion)
check("errors", error_is_typed)
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
