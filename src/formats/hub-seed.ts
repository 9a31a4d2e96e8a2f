// Seeding the Hugging Face cache with a local copy of a hub file, so that `hf://owner/repo/file` resolves
// offline (CI machines have no network; ../shared holds the same files the hub serves).

import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, readFileSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { ConfigError } from '../core/errors.ts';
import { hubCacheDir, parseHubUri, repoCacheDir } from './hub.ts';

/**
 * Puts `file` into the cache as `uri` (hf://owner/repo[@rev]/path): blobs/<sha256>, a snapshot link and the
 * ref. The snapshot's commit id is derived from the content (sha1), since no hub was asked. Returns the
 * snapshot path. Does nothing when the file is already cached with the same content.
 */
export function seedHubCache(uri: string, file: string, cacheDir = hubCacheDir()): string {
  const ref = parseHubUri(uri);
  if (!ref.path) throw new ConfigError(`seedHubCache: ${uri} names no file (hf://owner/repo/path)`);
  const bytes = readFileSync(file);
  const sha256 = createHash('sha256').update(bytes).digest('hex');
  const commit = createHash('sha1').update(bytes).digest('hex');
  const repoDir = repoCacheDir(ref.repo, cacheDir);
  const blob = join(repoDir, 'blobs', sha256);
  const snap = join(repoDir, 'snapshots', commit, ref.path);
  mkdirSync(dirname(blob), { recursive: true });
  mkdirSync(dirname(snap), { recursive: true });
  if (!existsSync(blob)) copyFileSync(file, blob);
  if (existsSync(snap)) unlinkSync(snap);
  symlinkSync(relative(dirname(snap), blob), snap);
  const refFile = join(repoDir, 'refs', ref.revision);
  mkdirSync(dirname(refFile), { recursive: true });
  writeFileSync(refFile, commit);
  return snap;
}
