#!/usr/bin/env python3
"""The OpenAI Agents SDK against moeserve: one agent with one function tool and
`tool_choice="required"`, run over the Responses API and over Chat Completions, each
streamed and not. Each run must call the tool, then end with a final answer (the SDK sets
the choice back to auto after the forced call); a 135M model's answer is not judged, the
protocol is.

    MOESERVE_URL=http://127.0.0.1:8080 MOESERVE_MODEL=<id> python tests/agents/agents_sdk.py
"""

import asyncio
import os

from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

URL = os.environ["MOESERVE_URL"]
MODEL = os.environ["MOESERVE_MODEL"]
calls = []


@function_tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    calls.append(city)
    return f"Sunny and 21 C in {city}."


async def main():
    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=URL + "/v1", api_key="none", max_retries=0)
    for api, model in [
        ("responses", OpenAIResponsesModel(model=MODEL, openai_client=client)),
        ("chat", OpenAIChatCompletionsModel(model=MODEL, openai_client=client)),
    ]:
        for stream in (False, True):
            calls.clear()
            agent = Agent(
                name="weather",
                instructions="You answer questions about the weather. Use the tool.",
                tools=[get_weather],
                model=model,
                model_settings=ModelSettings(tool_choice="required", max_tokens=96, temperature=0),
            )
            question = "What is the weather in Paris?"
            if stream:
                result = Runner.run_streamed(agent, question, max_turns=6)
                async for _ in result.stream_events():
                    pass
            else:
                result = await Runner.run(agent, question, max_turns=6)
            assert calls, f"{api} stream={stream}: the tool was not called"
            assert result.final_output is not None, f"{api} stream={stream}: no final answer"
            print(f"{api:9} stream={stream!s:5}: {len(calls)} tool call(s), final answer {str(result.final_output)[:60]!r}")


asyncio.run(main())
