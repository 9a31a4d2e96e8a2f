// Chat templates (exact rendered text for ChatML/Qwen- and Llama-3-style templates) and loading a
// Hugging Face model dir: tokenizer.json + tokenizer_config.json + chat_template.jinja + generation_config.json.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { ConfigError, DataError, FormatError } from '../../src/core/errors.ts';
import { BYTE_TO_CHAR } from '../../src/tokenize/byte-level.ts';
import { CHATML_TEMPLATE, renderChatTemplate } from '../../src/tokenize/chat.ts';
import { byteLevelBpeJson } from '../../src/tokenize/gguf.ts';
import { loadTokenizer, tokenizerFromHfDir } from '../../src/tokenize/hf.ts';
import { QWEN2_PATTERN } from '../../src/tokenize/pre-tokenizers.ts';

const QWEN_TEMPLATE = `{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
`;

const LLAMA3_TEMPLATE =
  "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + " +
  "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}" +
  '{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}' +
  "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

const STRICT_TEMPLATE =
  "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}[{{ m.role }}] {{ m.content }}\n{% endfor %}";

const conversation = [
  { role: 'user', content: 'Hello' },
  { role: 'assistant', content: 'Hi there' },
  { role: 'user', content: 'How are you?' },
];

test('a Qwen-style ChatML template renders exactly', () => {
  const out = renderChatTemplate({ default: QWEN_TEMPLATE }, 'test', conversation, {}, { addGenerationPrompt: true });
  assert.equal(
    out,
    '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' +
      '<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n' +
      '<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n',
  );
  const sys = [{ role: 'system', content: 'Be brief.' }, ...conversation.slice(0, 1)];
  assert.equal(
    renderChatTemplate({ default: QWEN_TEMPLATE }, 'test', sys, {}),
    '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n',
  );
  const tools = [{ type: 'function', function: { name: 'get_time', parameters: { type: 'object' } } }];
  assert.equal(
    renderChatTemplate({ default: QWEN_TEMPLATE }, 'test', conversation.slice(0, 1), {}, { tools }),
    '<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n<tools>\n' +
      '{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}' +
      '\n</tools><|im_end|>\n<|im_start|>user\nHello<|im_end|>\n',
  );
});

test('a Llama-3-style template renders exactly, with bos_token and trimmed content', () => {
  const msgs = [
    { role: 'system', content: 'You are helpful.' },
    { role: 'user', content: '  Hi!  ' },
  ];
  const specials = { bos_token: '<|begin_of_text|>', eos_token: '<|end_of_text|>' };
  assert.equal(
    renderChatTemplate({ default: LLAMA3_TEMPLATE }, 'test', msgs, specials, { addGenerationPrompt: true }),
    '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>' +
      '<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
  );
  assert.equal(
    renderChatTemplate({ default: LLAMA3_TEMPLATE }, 'test', msgs.slice(1), specials),
    '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>',
  );
});

test('template choice: named templates, explicit template, ChatML only on request, clear errors', () => {
  const named = { default: '{{ "D" }}', tool_use: '{{ "T" }}' };
  const m = [{ role: 'user', content: 'x' }];
  assert.equal(renderChatTemplate(named, 's', m, {}), 'D');
  assert.equal(renderChatTemplate(named, 's', m, {}, { tools: [{}] }), 'T');
  assert.equal(renderChatTemplate(named, 's', m, {}, { templateName: 'tool_use' }), 'T');
  assert.equal(renderChatTemplate(named, 's', m, {}, { template: '{{ messages[0].content }}!' }), 'x!');
  assert.equal(renderChatTemplate(named, 's', m, {}, { extra: { flag: 'F' }, template: '{{ flag }}' }), 'F');
  assert.throws(() => renderChatTemplate(named, 's', m, {}, { templateName: 'rag' }), /no chat template named 'rag'/);
  // The model's own template wins over the fallback.
  assert.equal(renderChatTemplate(named, 's', m, {}, { fallback: 'chatml' }), 'D');
  assert.throws(
    () => renderChatTemplate({}, '/models/base-model', m, {}),
    (e: Error) =>
      e instanceof ConfigError &&
      e.message.startsWith('/models/base-model: this tokenizer has no chat template') &&
      /chat_template\.jinja/.test(e.message) &&
      /fallback: 'chatml'/.test(e.message),
  );
  assert.equal(
    renderChatTemplate({}, 's', m, {}, { fallback: 'chatml', addGenerationPrompt: true }),
    '<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n',
  );
  assert.equal(renderChatTemplate({ default: CHATML_TEMPLATE }, 's', m, {}), '<|im_start|>user\nx<|im_end|>\n');
  assert.throws(
    () => renderChatTemplate({ default: STRICT_TEMPLATE }, 's', [{ role: 'system', content: 'x' }], {}),
    (e: Error) => e instanceof DataError && /Only user and assistant roles are supported/.test(e.message),
  );
  assert.throws(() => renderChatTemplate({ default: '{% for %}' }, 's', m, {}), FormatError);
  assert.throws(() => renderChatTemplate(named, 's', [{ content: 'no role' } as never], {}), DataError);
});

// ---- a Hugging Face model dir on disk ----

const root = mkdtempSync(join(tmpdir(), 'lowrank-tok-'));
after(() => rmSync(root, { recursive: true, force: true }));

const SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>'];

function writeModelDir(name: string, files: Record<string, unknown>): string {
  const dir = join(root, name);
  mkdirSync(dir, { recursive: true });
  const tokens = [...BYTE_TO_CHAR, 'He', 'll', 'Hell', 'Hello', ...SPECIALS];
  const types = tokens.map((t) => (SPECIALS.includes(t) ? 3 : 1));
  const merges: [string, string][] = [
    ['H', 'e'],
    ['l', 'l'],
    ['He', 'll'],
    ['Hell', 'o'],
  ];
  const json = byteLevelBpeJson(tokens, types, merges, [QWEN2_PATTERN]);
  writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify(files['tokenizer.json'] ?? json));
  for (const [f, v] of Object.entries(files)) {
    if (f !== 'tokenizer.json') writeFileSync(join(dir, f), typeof v === 'string' ? v : JSON.stringify(v));
  }
  return dir;
}

test('HF model dir: special tokens as objects, named templates, generation_config eos list', () => {
  const dir = writeModelDir('qwen-like', {
    'tokenizer_config.json': {
      bos_token: null,
      eos_token: { content: '<|im_end|>', lstrip: false, normalized: false, rstrip: false, special: true },
      pad_token: '<|endoftext|>',
      add_bos_token: false,
      chat_template: [
        { name: 'default', template: QWEN_TEMPLATE },
        { name: 'tool_use', template: '{{ "tools: " + (tools | length | string) }}' },
      ],
    },
    'generation_config.json': { eos_token_id: [258, 256 + 4 + 2] },
  });
  const tok = tokenizerFromHfDir(dir);
  const imStart = tok.tokenToId('<|im_start|>')!;
  const imEnd = tok.tokenToId('<|im_end|>')!;
  const eot = tok.tokenToId('<|endoftext|>')!;
  assert.equal(tok.bosId, null);
  assert.equal(tok.eosId, imEnd);
  assert.equal(tok.padId, eot);
  assert.equal(tok.addBos, false);
  assert.ok(tok.eosIds.has(imEnd) && tok.eosIds.has(eot) && tok.eosIds.has(258));
  assert.equal(tok.applyChatTemplate(conversation, { tools: [{}, {}] }), 'tools: 2');
  const ids = tok.encodeChat(conversation.slice(0, 1), { addGenerationPrompt: true });
  assert.equal(ids[0], imStart);
  assert.equal(ids.filter((id) => id === imEnd).length, 2);
  assert.ok(ids.includes(tok.tokenToId('Hello')!));
  assert.equal(tok.decode(ids), tok.applyChatTemplate(conversation.slice(0, 1), { addGenerationPrompt: true }));
  assert.equal(tok.decode(ids, { skipSpecialTokens: true }).startsWith('system\n'), true);
  assert.equal(loadTokenizer(dir).vocabSize, tok.vocabSize);
});

test('HF model dir: chat_template.jinja wins; BOS inferred from a TemplateProcessing post-processor', () => {
  const base = writeModelDir('llama-like-base', {});
  const json = JSON.parse(readFileSync(join(base, 'tokenizer.json'), 'utf8'));
  json.post_processor = {
    type: 'TemplateProcessing',
    single: [{ SpecialToken: { id: '<|endoftext|>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
    pair: [],
    special_tokens: { '<|endoftext|>': { id: '<|endoftext|>', ids: [260], tokens: ['<|endoftext|>'] } },
  };
  const dir = writeModelDir('llama-like', {
    'tokenizer.json': json,
    'tokenizer_config.json': { eos_token: '<|im_end|>', chat_template: 'from config' },
    'chat_template.jinja': '{{ bos_token }}{{ messages[0].content }}',
  });
  const tok = tokenizerFromHfDir(dir);
  assert.equal(tok.addBos, true);
  assert.equal(tok.bosId, 260);
  assert.deepEqual(tok.encode('Hello'), [260, tok.tokenToId('Hello')]);
  assert.equal(tok.applyChatTemplate([{ role: 'user', content: 'Hi' }]), '<|endoftext|>Hi');
  // BOS comes from the template, so encodeChat adds none of its own.
  assert.deepEqual(tok.encodeChat([{ role: 'user', content: 'Hello' }]), [260, tok.tokenToId('Hello')]);
});

test('HF model dir without a template, and broken dirs, give typed errors naming the file', () => {
  const dir = writeModelDir('base', { 'tokenizer_config.json': { eos_token: '<|endoftext|>' } });
  const tok = tokenizerFromHfDir(dir);
  assert.equal(tok.hasChatTemplate, false);
  assert.throws(
    () => tok.applyChatTemplate(conversation),
    (e: Error) => e instanceof ConfigError && e.message.startsWith(`${dir}: this tokenizer has no chat template`),
  );
  assert.equal(
    tok.applyChatTemplate(conversation.slice(0, 1), { fallback: 'chatml' }),
    '<|im_start|>user\nHello<|im_end|>\n',
  );
  const bad = writeModelDir('bad-config', { 'tokenizer_config.json': '{ not json' });
  assert.throws(
    () => tokenizerFromHfDir(bad),
    (e: Error) => e instanceof FormatError && e.message.includes('tokenizer_config.json'),
  );
  const badTok = writeModelDir('bad-special', { 'tokenizer_config.json': { eos_token: 5 } });
  assert.throws(() => tokenizerFromHfDir(badTok), /"eos_token" must be a string or an object with "content"/);
  const empty = join(root, 'empty');
  mkdirSync(empty);
  assert.throws(
    () => tokenizerFromHfDir(empty),
    (e: Error) => e instanceof FormatError && /no tokenizer\.json/.test(e.message),
  );
  assert.throws(() => loadTokenizer(join(root, 'missing')), /no such file or directory/);
  const unknownType = writeModelDir('unknown-type', {
    'tokenizer.json': { model: { type: 'Nope' }, added_tokens: [] },
  });
  assert.throws(
    () => tokenizerFromHfDir(unknownType),
    (e: Error) => e instanceof FormatError && /cannot build the tokenizer/.test(e.message),
  );
});
