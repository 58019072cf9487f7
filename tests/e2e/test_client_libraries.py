"""The client libraries users pair with an OpenAI-compatible server, against the real stack, with forced tools and
structured output: the paths where a stray `<tool_call>` fragment in `content`, a second call, or a chunk with two
entries for one call index broke them. Each library is used as its own documentation shows, pointed at this server
by base URL and key only.
"""

from __future__ import annotations

import asyncio
import json
import os

import jsonschema
from pydantic import BaseModel, Field

# litellm would otherwise fetch its model price list from the internet at import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}
ASK = "What is the weather in Paris?"


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny in {city}."


class Planet(BaseModel):
    name: str = Field(max_length=12)
    order_from_sun: int = Field(ge=1, le=8)


def test_langchain_bind_tools_with_a_named_tool(stack, model):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    weather = tool(get_weather)
    llm = ChatOpenAI(model=model, base_url=stack.base_url, api_key=stack.api_key, temperature=0, max_tokens=60,
                     max_retries=0)
    reply = llm.bind_tools([weather], tool_choice="get_weather").invoke(ASK)
    assert reply.content == "" and len(reply.tool_calls) == 1, reply
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], CITY_SCHEMA)
    streamed = None
    for chunk in llm.bind_tools([weather], tool_choice="get_weather").stream(ASK):
        streamed = chunk if streamed is None else streamed + chunk
    assert [c["name"] for c in streamed.tool_calls] == ["get_weather"]
    assert streamed.tool_calls[0]["args"] == call["args"]  # streamed fragments add up to the same call


def test_instructor_tools_mode(stack, model):
    import instructor
    import openai

    client = instructor.from_openai(
        openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0), mode=instructor.Mode.TOOLS
    )
    planet = client.chat.completions.create(
        model=model, response_model=Planet, max_retries=0, temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Describe the planet Saturn."}],
    )
    assert isinstance(planet, Planet)


def test_litellm_forced_tool_call(stack, model):
    import litellm

    response = litellm.completion(
        model=f"openai/{model}", api_base=stack.base_url, api_key=stack.api_key, temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": ASK}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": CITY_SCHEMA}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    message = response.choices[0].message
    assert not message.content and len(message.tool_calls) == 1
    jsonschema.validate(json.loads(message.tool_calls[0].function.arguments), CITY_SCHEMA)


def test_pydantic_ai_structured_output(stack, model):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    llm = OpenAIChatModel(model, provider=OpenAIProvider(base_url=stack.base_url, api_key=stack.api_key))
    agent = Agent(llm, output_type=Planet, model_settings={"temperature": 0, "max_tokens": 60}, retries=0)
    result = agent.run_sync("Describe the planet Saturn.")
    assert isinstance(result.output, Planet)


def test_openai_agents_with_the_chat_completions_model(stack, model):
    """The Agents SDK's default model class speaks the Responses API; its chat-completions class is what works here."""
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # its traces go to OpenAI's servers
    client = AsyncOpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)
    agent = Agent(
        name="weather",
        instructions="Answer with the weather tool.",
        tools=[function_tool(get_weather)],
        model=OpenAIChatCompletionsModel(model=model, openai_client=client),
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
        tool_use_behavior="stop_on_first_tool",
    )
    result = asyncio.run(Runner.run(agent, ASK, max_turns=2))
    assert result.final_output.startswith("It is sunny in ")


def test_llama_index_openai_like_required_tool(stack, model):
    from llama_index.core.tools import FunctionTool
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(model=model, api_base=stack.base_url, api_key=stack.api_key, is_chat_model=True,
                     is_function_calling_model=True, temperature=0, max_tokens=60, max_retries=0)
    weather = FunctionTool.from_defaults(fn=get_weather)
    response = llm.chat_with_tools([weather], user_msg=ASK, tool_required=True)
    calls = llm.get_tool_calls_from_response(response, error_on_no_tool_call=True)
    assert [c.tool_name for c in calls] == ["get_weather"]
    jsonschema.validate(calls[0].tool_kwargs, CITY_SCHEMA)
