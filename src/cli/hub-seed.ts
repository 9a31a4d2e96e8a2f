// lowrank hub-seed <hf://owner/repo/path> <file>: put a local copy of a hub file into the Hugging Face cache,
// so configs that name the hf:// file work offline.

import type { Command } from 'commander';
import { seedHubCache } from '../formats/hub-seed.ts';

export function registerHubSeed(program: Command): void {
  program
    .command('hub-seed')
    .description('copy a local file into the Hugging Face cache as hf://owner/repo/path (for offline use)')
    .argument('<uri>', 'hf://owner/repo[@revision]/path')
    .argument('<file>', 'the local copy')
    .action((uri: string, file: string) => {
      console.log(seedHubCache(uri, file));
    });
}
