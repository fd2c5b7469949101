#!/usr/bin/env node
// Conformance: the official OpenAI Node SDK against a running moeserve.
//
//     (cd tests/conformance/node && npm ci)
//     MOESERVE_URL=http://127.0.0.1:8080 MOESERVE_API_KEY=... node tests/conformance/node/openai_sdk.mjs
//
// The same checks as ../openai_sdk.py, one for one: chat (plain and streamed with usage),
// completions, the models list, that errors surface as the SDK's typed errors, structured
// outputs (json_object, json_schema validated with `ajv`, `chat.completions.parse` with a zod
// schema through `zodResponseFormat`) and tool calls. Prints one line per check and a summary;
// exits 1 when any check failed.

import { AssertionError } from 'node:assert';
import { inspect } from 'node:util';

import { Ajv2020 } from 'ajv/dist/2020.js';
import OpenAI, { BadRequestError, NotFoundError } from 'openai';
import { zodResponseFormat } from 'openai/helpers/zod';
import { z } from 'zod';

const base = (process.env.MOESERVE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '') + '/v1';
const client = new OpenAI({ baseURL: base, apiKey: process.env.MOESERVE_API_KEY || 'none', maxRetries: 0 });
let passed = 0;
let failed = 0;

const show = (v) => inspect(v, { depth: 8, breakLength: Infinity });

function expect(cond, detail) {
  if (!cond) throw new AssertionError({ message: detail === undefined ? 'expectation failed' : show(detail) });
}

// Draft 2020-12, as the Python script's `jsonschema.validate` picks for these schemas; not
// strict, since jsonschema ignores what it does not know too.
const ajv = new Ajv2020({ strict: false, allErrors: true });

function validate(instance, schema) {
  const valid = ajv.validate(schema, instance);
  if (!valid) throw new Error(`${ajv.errorsText(ajv.errors)}: ${show(instance)}`);
}

async function check(name, fn) {
  try {
    const detail = await fn();
    passed += 1;
    console.log(`ok   ${name}: ${detail}`);
  } catch (e) {
    // report every failure and go on
    failed += 1;
    console.log(`FAIL ${name}: ${e?.constructor?.name ?? typeof e}: ${e?.message ?? e}`);
  }
}

async function models() {
  const page = await client.models.list();
  const ids = page.data.map((m) => m.id);
  expect(ids.length === 1 && page.data[0].object === 'model', ids);
  expect((await client.models.retrieve(ids[0])).id === ids[0]);
  return ids[0];
}

const model = await models();

async function chat() {
  const r = await client.chat.completions.create({
    model,
    messages: [
      { role: 'system', content: 'You are brief.' },
      { role: 'user', content: 'What is the capital of France?' },
    ],
    max_tokens: 24,
    temperature: 0,
  });
  const c = r.choices[0];
  expect(r.object === 'chat.completion' && r.id.startsWith('chatcmpl-'), r);
  expect(c.message.role === 'assistant' && c.message.content, c);
  expect(['stop', 'length'].includes(c.finish_reason), c);
  expect(r.usage.total_tokens === r.usage.prompt_tokens + r.usage.completion_tokens, r.usage);
  return JSON.stringify(c.message.content);
}

async function chatStream() {
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'Count to five.' }],
    max_tokens: 16,
    temperature: 0,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = '';
  let usage = null;
  let finish = null;
  for await (const chunk of stream) {
    if (chunk.usage != null) {
      usage = chunk.usage;
      expect(chunk.choices.length === 0, chunk);
      continue;
    }
    const d = chunk.choices[0];
    text += d.delta.content ?? '';
    finish = d.finish_reason || finish;
  }
  expect(usage != null && usage.completion_tokens > 0, usage);
  expect(['stop', 'length'].includes(finish), finish);
  return `${usage.completion_tokens} tokens, ${JSON.stringify(text)}`;
}

async function completion() {
  const r = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 8, temperature: 0, logprobs: 2 });
  const c = r.choices[0];
  expect(r.object === 'text_completion' && c.text, r);
  expect(c.logprobs.tokens.length === r.usage.completion_tokens, [c.logprobs, r.usage]);
  return JSON.stringify(c.text);
}

async function errorIsTyped() {
  try {
    await client.chat.completions.create({ model, messages: [], max_tokens: 4 });
    throw new AssertionError({ message: 'empty messages were accepted' });
  } catch (e) {
    if (!(e instanceof BadRequestError)) throw e;
    expect(e.status === 400 && e.error.param === 'messages', e.error);
  }
  try {
    await client.chat.completions.create({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] });
  } catch (e) {
    if (!(e instanceof NotFoundError)) throw e;
    expect(e.status === 404, e.status);
    return `400 and 404 thrown as ${e.constructor.name}`;
  }
  throw new AssertionError({ message: 'an unknown model was accepted' });
}

async function ask(responseFormat, { stream = false, seed = 5 } = {}) {
  const args = {
    model,
    messages: [{ role: 'user', content: 'Describe a person as JSON.' }],
    max_tokens: 200,
    temperature: 0.7,
    seed,
    response_format: responseFormat,
  };
  if (!stream) {
    const c = (await client.chat.completions.create(args)).choices[0];
    return [c.message.content, c.finish_reason];
  }
  let text = '';
  let finish = null;
  for await (const chunk of await client.chat.completions.create({ ...args, stream: true })) {
    if (chunk.choices.length) {
      text += chunk.choices[0].delta.content ?? '';
      finish = chunk.choices[0].finish_reason || finish;
    }
  }
  return [text, finish];
}

const SCHEMAS = {
  'nested object': {
    type: 'object',
    properties: {
      name: { type: 'string', maxLength: 20 },
      address: {
        type: 'object',
        properties: { city: { type: 'string', maxLength: 20 }, zip: { type: 'string', pattern: '^[0-9]{5}$' } },
        required: ['city', 'zip'],
        additionalProperties: false,
      },
    },
    required: ['name', 'address'],
    additionalProperties: false,
  },
  'array with bounds': {
    type: 'object',
    properties: { scores: { type: 'array', items: { type: 'integer', minimum: 0, maximum: 100 }, minItems: 2, maxItems: 4 } },
    required: ['scores'],
    additionalProperties: false,
  },
  'enum and anyOf with null': {
    type: 'object',
    properties: {
      color: { enum: ['red', 'green', 'blue'] },
      nickname: { anyOf: [{ type: 'string', maxLength: 12 }, { type: 'null' }] },
    },
    required: ['color', 'nickname'],
    additionalProperties: false,
  },
  $ref: {
    type: 'object',
    properties: { home: { $ref: '#/$defs/place' }, work: { $ref: '#/$defs/place' } },
    required: ['home', 'work'],
    additionalProperties: false,
    $defs: {
      place: {
        type: 'object',
        properties: { floor: { type: 'integer', minimum: 0, maximum: 50 } },
        required: ['floor'],
        additionalProperties: false,
      },
    },
  },
};

async function jsonSchemas() {
  const done = [];
  for (const [name, schema] of Object.entries(SCHEMAS)) {
    const fmt = { type: 'json_schema', json_schema: { name: 'out', schema, strict: true } };
    const [text, finish] = await ask(fmt);
    expect(finish === 'stop', [name, finish, text]);
    validate(JSON.parse(text), schema);
    const [streamed] = await ask(fmt, { stream: true });
    expect(streamed === text, [name, streamed, text]);
    done.push(name);
  }
  return done.join(', ') + ': valid, streamed == non-streamed';
}

async function jsonObject() {
  const [text, finish] = await ask({ type: 'json_object' }, { seed: 1 });
  if (finish === 'stop') {
    const v = JSON.parse(text);
    expect(v !== null && typeof v === 'object' && !Array.isArray(v), text);
  } else {
    expect(text.startsWith('{'), text);
  }
  return `${finish}: ${JSON.stringify(text.slice(0, 60))}`;
}

// The pydantic `Person` of the Python script: extra keys forbidden (zodResponseFormat makes
// every object strict), `manager` required but nullable.
const Person = z.object({
  name: z.string().max(16),
  age: z.number().int().min(0).max(120),
  role: z.enum(['admin', 'user']),
  manager: z.string().max(16).nullable(),
});

async function parse() {
  const r = await client.chat.completions.parse({
    model,
    messages: [{ role: 'user', content: 'Invent a user of a web site.' }],
    response_format: zodResponseFormat(Person, 'Person'),
    max_tokens: 200,
    temperature: 0,
  });
  const p = r.choices[0].message.parsed;
  expect(p != null && Person.safeParse(p).success, r);
  return JSON.stringify(p);
}

async function badSchemaIs400() {
  try {
    await ask({ type: 'json_schema', json_schema: { name: 'x', schema: { type: 'no-such-type' } } });
  } catch (e) {
    if (!(e instanceof BadRequestError)) throw e;
    expect(e.error.param === 'response_format.json_schema.schema', e.error);
    return e.error.message.slice(0, 80);
  }
  throw new AssertionError({ message: 'an invalid schema was accepted' });
}

const TOOLS = [
  {
    type: 'function',
    function: {
      name: 'get_weather',
      description: 'The current weather in a city',
      parameters: {
        type: 'object',
        properties: { city: { type: 'string', maxLength: 20 }, unit: { enum: ['celsius', 'fahrenheit'] } },
        required: ['city', 'unit'],
        additionalProperties: false,
      },
    },
  },
  {
    type: 'function',
    function: {
      name: 'get_time',
      parameters: { type: 'object', properties: { city: { type: 'string', maxLength: 20 } }, required: ['city'] },
    },
  },
];
const WEATHER_Q = [{ role: 'user', content: 'What is the weather in Paris?' }];

async function callTools(toolChoice, { stream = false, ...extra } = {}) {
  const args = { model, messages: WEATHER_Q, tools: TOOLS, tool_choice: toolChoice, max_tokens: 120, temperature: 0, ...extra };
  if (!stream) return (await client.chat.completions.create(args)).choices[0];
  const calls = {};
  let finish = null;
  for await (const chunk of await client.chat.completions.create({ ...args, stream: true })) {
    for (const d of chunk.choices[0]?.delta.tool_calls ?? []) {
      calls[d.index] ??= { id: d.id, name: d.function?.name, arguments: '' };
      calls[d.index].arguments += d.function?.arguments ?? '';
    }
    if (chunk.choices[0]?.finish_reason) finish = chunk.choices[0].finish_reason;
  }
  return [calls, finish];
}

function checkCall(call) {
  const tool = TOOLS.find((t) => t.function.name === call.function.name);
  expect(tool, call);
  validate(JSON.parse(call.function.arguments), tool.function.parameters);
  expect(call.id.startsWith('call_') && call.type === 'function', call);
}

async function toolRequired() {
  const c = await callTools('required', { parallel_tool_calls: false });
  expect(c.finish_reason === 'tool_calls' && c.message.content == null, c);
  expect(c.message.tool_calls?.length === 1, c.message.tool_calls);
  checkCall(c.message.tool_calls[0]);
  const f = c.message.tool_calls[0].function;
  return `${f.name}(${f.arguments})`;
}

async function toolNamed() {
  const choice = { type: 'function', function: { name: 'get_time' } };
  const c = await callTools(choice);
  expect(c.finish_reason === 'tool_calls', c);
  const call = c.message.tool_calls[0];
  expect(call.function.name === 'get_time', call);
  checkCall(call);
  const [calls, finish] = await callTools(choice, { stream: true });
  expect(finish === 'tool_calls' && calls[0]?.name === 'get_time', [calls, finish]);
  expect(calls[0].arguments === call.function.arguments, [calls, call]);
  return `${call.function.arguments}, streamed pieces add up to the same`;
}

async function toolNone() {
  const c = await callTools('none');
  expect(!c.message.tool_calls?.length && c.finish_reason !== 'tool_calls', c);
  return JSON.stringify(c.message.content.slice(0, 40));
}

async function toolRoundTrip() {
  const first = await callTools({ type: 'function', function: { name: 'get_weather' } });
  const call = first.message.tool_calls[0];
  const r = await client.chat.completions.create({
    model,
    messages: [
      ...WEATHER_Q,
      { role: 'assistant', content: null, tool_calls: [call] },
      { role: 'tool', tool_call_id: call.id, content: JSON.stringify({ temperature: 21, sky: 'clear' }) },
    ],
    tools: TOOLS,
    max_tokens: 40,
    temperature: 0,
  });
  const c = r.choices[0];
  expect(c.message.content || c.message.tool_calls?.length, c);
  return JSON.stringify((c.message.content ?? '').slice(0, 60));
}

async function toolErrors() {
  try {
    await callTools({ type: 'function', function: { name: 'no_such_tool' } });
  } catch (e) {
    if (!(e instanceof BadRequestError)) throw e;
    expect(e.error.param === 'tool_choice', e.error);
    return e.error.message;
  }
  throw new AssertionError({ message: 'an unknown function was accepted' });
}

await check('models.list/retrieve', () => model);
await check('chat.completions.create', chat);
await check('chat.completions.create(stream: true, include_usage)', chatStream);
await check('completions.create(logprobs: 2)', completion);
await check('errors', errorIsTyped);
await check('response_format json_schema', jsonSchemas);
await check('response_format json_object', jsonObject);
await check('chat.completions.parse(zodResponseFormat)', parse);
await check('invalid schema', badSchemaIs400);
await check('tools, tool_choice=required', toolRequired);
await check('tools, tool_choice=named, streamed', toolNamed);
await check('tools, tool_choice=none', toolNone);
await check('tool result round trip', toolRoundTrip);
await check('tool errors', toolErrors);
console.log(`${passed} passed, ${failed} failed`);
process.exitCode = failed ? 1 : 0;
