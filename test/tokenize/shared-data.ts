// Where the tokenizer tests find ../shared (relative to the repo root), and how they skip without it.
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

export const SHARED = fileURLToPath(new URL('../../../shared/', import.meta.url));

/** false when every path exists under ../shared, else the reason to skip (also printed). */
export function skipUnless(...relPaths: string[]): false | string {
  const missing = relPaths.filter((p) => !existsSync(SHARED + p));
  if (missing.length === 0) return false;
  const reason = `reference data absent: ${missing.map((p) => SHARED + p).join(', ')}`;
  console.log(`skipping: ${reason}`);
  return reason;
}

/** llama.cpp's vocab test pairs: inputs split on the separator line, expected ids one line per input. */
export function readVocabVectors(name: string): { text: string; ids: number[] }[] {
  const base = `${SHARED}tokenizers/ggml-vocab/ggml-vocab-${name}.gguf`;
  const inputs = readFileSync(`${base}.inp`, 'utf8').split('\n__ggml_vocab_test__\n');
  inputs.pop(); // the empty tail after the last separator
  const lines = readFileSync(`${base}.out`, 'utf8').split('\n');
  return inputs.map((text, i) => {
    const line = (lines[i] ?? '').trim();
    return { text, ids: line === '' ? [] : line.split(/\s+/).map(Number) };
  });
}
