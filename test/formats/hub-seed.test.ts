import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { resolveHubUri } from '../../src/formats/hub.ts';
import { seedHubCache } from '../../src/formats/hub-seed.ts';

const STORIES = '../shared/models/stories260K/stories260K.gguf';

test('a seeded cache resolves hf:// offline to the same bytes', {
  skip: !existsSync(STORIES) && 'needs ../shared',
}, async () => {
  const cache = mkdtempSync(join(tmpdir(), 'lowrank-hub-'));
  try {
    const uri = 'hf://ggml-org/models/tinyllamas/stories260K.gguf';
    seedHubCache(uri, STORIES, cache);
    seedHubCache(uri, STORIES, cache); // idempotent
    const p = await resolveHubUri(uri, { cacheDir: cache, offline: true });
    assert.deepEqual(readFileSync(p), readFileSync(STORIES));
  } finally {
    rmSync(cache, { recursive: true, force: true });
  }
});
