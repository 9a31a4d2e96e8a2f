// Chat templates: the Jinja programs in tokenizer_config.json / chat_template.jinja / GGUF metadata that turn
// a message list into the exact prompt text a model was trained on. Rendered with @huggingface/jinja, which
// tokenizes templates with trim_blocks + lstrip_blocks as transformers does, and given the same variables
// transformers passes (messages, add_generation_prompt, tools, documents, the special-token strings).

import { Template } from '@huggingface/jinja';
import { ConfigError, DataError, FormatError } from '../core/errors.ts';

export interface ChatMessage {
  role: string;
  content?: unknown;
  [key: string]: unknown;
}

export interface ChatTemplateOptions {
  /** Append the opening of an assistant turn so the model answers next (default false). */
  addGenerationPrompt?: boolean;
  /** Tool (function) definitions, as JSON-schema objects; passed to the template as `tools`. */
  tools?: readonly unknown[];
  /** Retrieval documents; passed as `documents`. */
  documents?: readonly unknown[];
  /** Use this named template of the model (e.g. 'tool_use') instead of the default one. */
  templateName?: string;
  /** Use this template text instead of the model's own. */
  template?: string;
  /** Only when the model has no template at all: use this built-in format instead of failing. */
  fallback?: 'chatml';
  /** Further template variables, e.g. { enable_thinking: false }. */
  extra?: Record<string, unknown>;
}

/** The ChatML format (<|im_start|>role\n...<|im_end|>\n), offered only as an explicit fallback. */
export const CHATML_TEMPLATE =
  "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}" +
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/**
 * Normalizes a `chat_template` value: a string is the default template; a list of {name, template} is a set of
 * named templates (transformers' format). `where` names the file and key for errors.
 */
export function parseChatTemplates(value: unknown, where: string): Record<string, string> {
  if (value === undefined || value === null) return {};
  if (typeof value === 'string') return { default: value };
  if (Array.isArray(value)) {
    const out: Record<string, string> = {};
    for (const [i, item] of value.entries()) {
      const it = item as { name?: unknown; template?: unknown } | null;
      if (!it || typeof it.name !== 'string' || typeof it.template !== 'string') {
        throw new FormatError(`${where}: entry ${i} of chat_template must be {"name": string, "template": string}`);
      }
      out[it.name] = it.template;
    }
    return out;
  }
  if (typeof value === 'object') {
    // Some tools write the named set as a plain object {name: template}.
    const out: Record<string, string> = {};
    for (const [name, t] of Object.entries(value as Record<string, unknown>)) {
      if (typeof t !== 'string') throw new FormatError(`${where}: chat_template["${name}"] must be a string`);
      out[name] = t;
    }
    return out;
  }
  throw new FormatError(`${where}: chat_template must be a string or a list of {name, template}`);
}

const compiled = new Map<string, Template>();

function compile(text: string, source: string, name: string): Template {
  let t = compiled.get(text);
  if (!t) {
    try {
      t = new Template(text);
    } catch (e) {
      throw new FormatError(`${source}: chat template '${name}' could not be parsed: ${(e as Error).message}`);
    }
    if (compiled.size > 64) compiled.clear();
    compiled.set(text, t);
  }
  return t;
}

function pickTemplate(
  templates: Readonly<Record<string, string>>,
  source: string,
  opts: ChatTemplateOptions,
): { name: string; text: string } {
  if (opts.template !== undefined) return { name: 'given', text: opts.template };
  const names = Object.keys(templates);
  if (opts.templateName !== undefined) {
    const text = templates[opts.templateName];
    if (text === undefined) {
      throw new ConfigError(
        `${source}: no chat template named '${opts.templateName}' (it has: ${names.length ? names.join(', ') : 'none'})`,
      );
    }
    return { name: opts.templateName, text };
  }
  if (opts.tools && opts.tools.length > 0 && templates.tool_use !== undefined) {
    return { name: 'tool_use', text: templates.tool_use };
  }
  if (templates.default !== undefined) return { name: 'default', text: templates.default };
  if (names.length === 1) return { name: names[0]!, text: templates[names[0]!]! };
  if (names.length > 1) {
    throw new ConfigError(
      `${source}: the model has several chat templates (${names.join(', ')}) and none is named 'default'; pick one with templateName`,
    );
  }
  if (opts.fallback === 'chatml') return { name: 'chatml', text: CHATML_TEMPLATE };
  throw new ConfigError(
    `${source}: this tokenizer has no chat template (no "chat_template" in tokenizer_config.json, no chat_template.jinja, ` +
      `no tokenizer.chat_template in GGUF metadata). Fix: add a chat_template.jinja file to the model dir, pass a template ` +
      `with { template: '...' }, or ask for the ChatML format with { fallback: 'chatml' } if the model was trained on it.`,
  );
}

/** Renders messages with the chosen template. specialTokens holds bos_token, eos_token and the like. */
export function renderChatTemplate(
  templates: Readonly<Record<string, string>>,
  source: string,
  messages: readonly ChatMessage[],
  specialTokens: Record<string, unknown>,
  opts: ChatTemplateOptions = {},
): string {
  if (!Array.isArray(messages)) throw new DataError(`${source}: chat messages must be an array`);
  for (const [i, m] of messages.entries()) {
    if (!m || typeof m !== 'object' || typeof m.role !== 'string') {
      throw new DataError(`${source}: chat message ${i} must be an object with a string "role"`);
    }
  }
  const { name, text } = pickTemplate(templates, source, opts);
  const template = compile(text, source, name);
  const vars: Record<string, unknown> = {
    ...specialTokens,
    ...(opts.extra ?? {}),
    messages,
    add_generation_prompt: opts.addGenerationPrompt ?? false,
  };
  if (opts.tools !== undefined) vars.tools = opts.tools;
  if (opts.documents !== undefined) vars.documents = opts.documents;
  try {
    return template.render(vars);
  } catch (e) {
    throw new DataError(`${source}: chat template '${name}' failed on these messages: ${(e as Error).message}`);
  }
}
