// Regenerates the bundled example datasets from their seeded generators (examples/*/make-data.ts), or with
// --check verifies that the committed files are what the generators make.
//
//   node --import tsx scripts/make-example-data.ts [--check]

import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { makeInvoiceData } from '../examples/invoice-extraction/make-data.ts';
import { makeStoriesData } from '../examples/stories-style/make-data.ts';
import { makeTicketsData } from '../examples/support-tickets/make-data.ts';

const EXAMPLES = fileURLToPath(new URL('../examples/', import.meta.url));
const GENERATORS: Record<string, () => { train: string; eval: string }> = {
  'stories-style': makeStoriesData,
  'support-tickets': makeTicketsData,
  'invoice-extraction': makeInvoiceData,
};

const check = process.argv.includes('--check');
let stale = 0;
for (const [name, make] of Object.entries(GENERATORS)) {
  const data = make();
  for (const split of ['train', 'eval'] as const) {
    const file = join(EXAMPLES, name, `${split}.jsonl`);
    const text = data[split];
    if (check) {
      const ok = existsSync(file) && readFileSync(file, 'utf8') === text;
      if (!ok) stale++;
      console.log(`${ok ? 'ok   ' : 'STALE'} ${file}`);
    } else {
      writeFileSync(file, text);
      console.log(`wrote ${file} (${text.split('\n').length - 1} records)`);
    }
  }
}
if (stale) {
  console.error(`${stale} file(s) differ from their generator: run node --import tsx scripts/make-example-data.ts`);
  process.exitCode = 1;
}
