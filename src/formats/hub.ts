// hf://owner/repo[@revision][/path] -> local files, through the standard Hugging Face cache, so files are shared
// with huggingface_hub, transformers and PEFT on the same machine.
//
// Cache layout (huggingface_hub file_download.py): $HF_HUB_CACHE (default $HF_HOME/hub, HF_HOME default
// $XDG_CACHE_HOME/huggingface or ~/.cache/huggingface) / models--owner--repo / {blobs/<etag>,
// snapshots/<commit>/<path> -> ../../blobs/<etag> (relative symlink), refs/<revision> (holds the commit)}.
// Download: HEAD {endpoint}/{repo}/resolve/{revision}/{path} (not following a redirect to another host) gives
// x-repo-commit and the etag (x-linked-etag for LFS files, which is their sha256; etag otherwise); the body is
// fetched into blobs/<etag>.incomplete (resumed with a Range header when that file exists), its sha256 checked
// when the etag is one, then renamed into blobs/ and linked from snapshots/.
//
// Policy: a file already in the cache for the requested revision is used without any request (pass
// `refresh: true` to ask the Hub for a newer commit). HF_HUB_OFFLINE=1 never touches the network.

import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { ConfigError, LowrankError } from '../core/errors.ts';
import { writeFileAtomic } from './atomic.ts';

/** A download or Hub lookup failed (network, HTTP status, checksum, or offline without a cached copy). */
export class HubError extends LowrankError {}
/** The Hub could not be reached at all (as opposed to answering with an error). */
class HubUnreachableError extends HubError {}

export interface HubRef {
  /** owner/name */
  repo: string;
  revision: string;
  /** A file inside the repo, or null for the whole model. */
  path: string | null;
}

export interface HubOptions {
  /** Overrides $HF_HUB_CACHE / $HF_HOME. */
  cacheDir?: string;
  /** Overrides $HF_ENDPOINT (default https://huggingface.co). */
  endpoint?: string;
  /** Overrides $HF_TOKEN; sent as a Bearer token. */
  token?: string;
  /** Overrides $HF_HUB_OFFLINE. */
  offline?: boolean;
  /** Ask the Hub for the revision's current commit even when a cached copy exists. */
  refresh?: boolean;
  /** Print download progress on stderr (default: when stderr is a TTY). */
  progress?: boolean;
  /** Environment to read the HF_* variables from (default process.env). */
  env?: NodeJS.ProcessEnv;
  /** fetch implementation (default the global fetch). */
  fetch?: typeof fetch;
}

const COMMIT_RE = /^[0-9a-f]{40}$/;
const SHA256_RE = /^[0-9a-f]{64}$/;

export function isHubUri(s: string): boolean {
  return s.startsWith('hf://');
}

function checkRelPath(p: string, what: string, uri: string): void {
  if (
    p === '' ||
    p.startsWith('/') ||
    p.includes('\\') ||
    p.split('/').some((s) => s === '' || s === '.' || s === '..')
  ) {
    throw new ConfigError(`${uri}: ${what} "${p}" must be a relative path without empty, "." or ".." parts`);
  }
}

/**
 * Parses hf://owner/repo[@revision][/path]. The revision may be percent-encoded (refs%2Fpr%2F1), as in
 * huggingface_hub's HfFileSystem; without one it is "main".
 */
export function parseHubUri(uri: string): HubRef {
  if (!isHubUri(uri)) throw new ConfigError(`"${uri}" is not an hf:// reference (expected hf://owner/repo[/file])`);
  const rest = uri.slice('hf://'.length).replace(/\/+$/, '');
  const parts = rest.split('/');
  if (parts.length < 2 || !parts[0] || !parts[1]) {
    throw new ConfigError(`"${uri}": expected hf://owner/repo[@revision][/path]`);
  }
  const owner = parts[0];
  let name = parts[1];
  let revision = 'main';
  const at = name.indexOf('@');
  if (at >= 0) {
    try {
      revision = decodeURIComponent(name.slice(at + 1));
    } catch {
      throw new ConfigError(`"${uri}": the revision after @ is not valid percent-encoding`);
    }
    name = name.slice(0, at);
    if (!revision) throw new ConfigError(`"${uri}": empty revision after @`);
  }
  const nameRe = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;
  if (!nameRe.test(owner) || !nameRe.test(name)) {
    throw new ConfigError(`"${uri}": "${owner}/${name}" is not a valid repo id (letters, digits, . _ -)`);
  }
  checkRelPath(revision, 'revision', uri);
  const file = parts.slice(2).join('/');
  if (file) checkRelPath(file, 'path', uri);
  return { repo: `${owner}/${name}`, revision, path: file || null };
}

function truthy(v: string | undefined): boolean {
  return v !== undefined && ['1', 'on', 'yes', 'true'].includes(v.trim().toLowerCase());
}

interface Settings {
  cacheDir: string;
  endpoint: string;
  token: string | undefined;
  offline: boolean;
  refresh: boolean;
  progress: boolean;
  fetch: typeof fetch;
}

/** The hub cache folder: $HF_HUB_CACHE, else $HF_HOME/hub, else ($XDG_CACHE_HOME or ~/.cache)/huggingface/hub. */
export function hubCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.HF_HUB_CACHE) return env.HF_HUB_CACHE;
  const home = env.HF_HOME || path.join(env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache'), 'huggingface');
  return path.join(home, 'hub');
}

function settings(o: HubOptions): Settings {
  const env = o.env ?? process.env;
  return {
    cacheDir: o.cacheDir ?? hubCacheDir(env),
    endpoint: (o.endpoint ?? env.HF_ENDPOINT ?? 'https://huggingface.co').replace(/\/+$/, ''),
    token: o.token ?? (env.HF_TOKEN || undefined),
    offline: o.offline ?? truthy(env.HF_HUB_OFFLINE),
    refresh: o.refresh ?? false,
    progress: o.progress ?? Boolean(process.stderr.isTTY),
    fetch: o.fetch ?? globalThis.fetch,
  };
}

/** models--owner--repo inside the cache. */
export function repoCacheDir(repo: string, cacheDir: string): string {
  return path.join(cacheDir, `models--${repo.split('/').join('--')}`);
}

function readRef(repoDir: string, revision: string): string | null {
  if (COMMIT_RE.test(revision)) return revision;
  try {
    const c = fs.readFileSync(path.join(repoDir, 'refs', revision), 'utf8').trim();
    return COMMIT_RE.test(c) ? c : null;
  } catch {
    return null;
  }
}

async function writeRef(repoDir: string, revision: string, commit: string): Promise<void> {
  if (revision === commit) return;
  const p = path.join(repoDir, 'refs', revision);
  await fsp.mkdir(path.dirname(p), { recursive: true });
  await writeFileAtomic(p, commit);
}

function encodePath(p: string): string {
  return p.split('/').map(encodeURIComponent).join('/');
}

function headers(s: Settings, extra: Record<string, string> = {}): Record<string, string> {
  const h: Record<string, string> = { 'user-agent': 'lowrank', ...extra };
  if (s.token) h.authorization = `Bearer ${s.token}`;
  return h;
}

function describeStatus(status: number, what: string, s: Settings): string {
  if (status === 401 || status === 403) {
    return `${what}: access denied (HTTP ${status}). ${s.token ? 'Your HF_TOKEN has no access: accept the model license on the Hub, or use a token with read access.' : 'The repo may be gated or private: set HF_TOKEN to a token with access.'}`;
  }
  if (status === 404) return `${what}: not found (HTTP 404): check the repo id, the revision and the file name`;
  return `${what}: the Hub answered HTTP ${status}`;
}

async function request(s: Settings, url: string, init: RequestInit, what: string): Promise<Response> {
  try {
    return await s.fetch(url, init);
  } catch (e) {
    const cause = (e as { cause?: { message?: string } }).cause?.message ?? (e as Error).message;
    throw new HubUnreachableError(
      `${what}: cannot reach ${s.endpoint} (${cause}). Check the network, or set HF_HUB_OFFLINE=1 to use only cached files`,
    );
  }
}

function cleanEtag(raw: string | null): string | null {
  if (!raw) return null;
  const e = raw.replace(/^W\//, '').replace(/^"|"$/g, '');
  return /^[A-Za-z0-9._-]+$/.test(e) && e !== '.' && e !== '..' ? e : null;
}

interface FileMeta {
  commit: string;
  etag: string;
  size: number | null;
  url: string;
}

/** HEAD on the resolve URL, following only same-host (relative) redirects, as huggingface_hub does. */
async function fileMeta(s: Settings, repo: string, revision: string, file: string): Promise<FileMeta> {
  const what = `hf://${repo}/${file}@${revision}`;
  const url = `${s.endpoint}/${repo}/resolve/${encodeURIComponent(revision)}/${encodePath(file)}`;
  let current = url;
  for (let hop = 0; hop < 5; hop++) {
    const res = await request(
      s,
      current,
      { method: 'HEAD', redirect: 'manual', headers: headers(s, { 'accept-encoding': 'identity' }) },
      what,
    );
    const h = res.headers;
    const location = h.get('location');
    if (res.status >= 300 && res.status < 400 && location) {
      const next = new URL(location, current);
      if (next.origin === new URL(current).origin && !h.get('x-linked-etag')) {
        current = next.toString();
        continue;
      }
    } else if (!res.ok) {
      throw new HubError(describeStatus(res.status, what, s));
    }
    const commit = h.get('x-repo-commit');
    const etag = cleanEtag(h.get('x-linked-etag') ?? h.get('etag'));
    if (!commit || !COMMIT_RE.test(commit) || !etag) {
      throw new HubError(
        `${what}: the server at ${s.endpoint} did not send a commit (x-repo-commit) and an etag; is HF_ENDPOINT a Hugging Face Hub?`,
      );
    }
    const sizeRaw = h.get('x-linked-size') ?? (res.status === 200 ? h.get('content-length') : null);
    const size = sizeRaw !== null && /^\d+$/.test(sizeRaw) ? Number(sizeRaw) : null;
    return { commit, etag, size, url };
  }
  throw new HubError(`${what}: too many redirects from ${s.endpoint}`);
}

async function hashFile(p: string, h: ReturnType<typeof createHash>): Promise<number> {
  let n = 0;
  for await (const chunk of fs.createReadStream(p)) {
    h.update(chunk as Buffer);
    n += (chunk as Buffer).byteLength;
  }
  return n;
}

function fmtMiB(n: number): string {
  return `${(n / 1048576).toFixed(1)} MiB`;
}

/** Downloads into `incomplete`, resuming from its current size; returns the sha256 of the whole file. */
async function downloadBlob(s: Settings, meta: FileMeta, incomplete: string, what: string): Promise<string> {
  for (let attempt = 0; attempt < 2; attempt++) {
    const hash = createHash('sha256');
    let have = 0;
    try {
      have = fs.statSync(incomplete).size;
    } catch {
      have = 0;
    }
    if (have > 0 && meta.size !== null && have > meta.size) {
      await fsp.rm(incomplete, { force: true });
      have = 0;
    }
    const extra: Record<string, string> = { 'accept-encoding': 'identity' };
    if (have > 0) extra.range = `bytes=${have}-`;
    const res = await request(s, meta.url, { method: 'GET', redirect: 'follow', headers: headers(s, extra) }, what);
    if (res.status === 416 && have > 0) {
      await res.body?.cancel();
      if (meta.size !== null && have === meta.size) {
        await hashFile(incomplete, hash);
        return hash.digest('hex');
      }
      await fsp.rm(incomplete, { force: true });
      continue;
    }
    if (!res.ok) {
      await res.body?.cancel();
      throw new HubError(describeStatus(res.status, what, s));
    }
    let append = false;
    if (res.status === 206) {
      const m = /^bytes (\d+)-/.exec(res.headers.get('content-range') ?? '');
      if (!m || Number(m[1]) !== have) {
        await res.body?.cancel();
        throw new HubError(`${what}: the server resumed at the wrong offset (${res.headers.get('content-range')})`);
      }
      append = true;
      await hashFile(incomplete, hash);
    } else {
      have = 0;
    }
    const handle = await fsp.open(incomplete, append ? 'a' : 'w');
    const total = meta.size;
    let got = have;
    let last = 0;
    try {
      if (res.body) {
        for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
          hash.update(chunk);
          let off = 0;
          while (off < chunk.byteLength) off += (await handle.write(chunk, off, chunk.byteLength - off)).bytesWritten;
          got += chunk.byteLength;
          if (s.progress && Date.now() - last > 100) {
            last = Date.now();
            process.stderr.write(`\rdownloading ${what}  ${fmtMiB(got)}${total !== null ? ` / ${fmtMiB(total)}` : ''}`);
          }
        }
      }
      await handle.sync();
    } finally {
      await handle.close();
    }
    if (s.progress) process.stderr.write(`\rdownloading ${what}  ${fmtMiB(got)} done\n`);
    if (total !== null && got !== total) {
      throw new HubError(
        `${what}: download ended at ${got} of ${total} bytes; run again to resume (partial data kept in ${incomplete})`,
      );
    }
    return hash.digest('hex');
  }
  throw new HubError(`${what}: the server refused to resume the download; delete ${incomplete} and try again`);
}

async function linkSnapshot(blob: string, target: string): Promise<void> {
  await fsp.mkdir(path.dirname(target), { recursive: true });
  const rel = path.relative(path.dirname(target), blob);
  try {
    if ((await fsp.readlink(target)) === rel) return;
  } catch {
    // absent, or not a link
  }
  await fsp.rm(target, { force: true });
  try {
    await fsp.symlink(rel, target);
  } catch {
    await fsp.copyFile(blob, target); // file systems without symlinks (as huggingface_hub does)
  }
}

function offlineMiss(repo: string, file: string | null, revision: string, s: Settings, why: string): HubError {
  return new HubError(
    `${why}: hf://${repo}${file ? `/${file}` : ''} at revision "${revision}" is not in the cache ` +
      `(${repoCacheDir(repo, s.cacheDir)}). Run once with network access, or unset HF_HUB_OFFLINE`,
  );
}

function cachedFile(repoDir: string, revision: string, file: string): string | null {
  const commit = readRef(repoDir, revision);
  if (!commit) return null;
  const p = path.join(repoDir, 'snapshots', commit, file);
  return fs.existsSync(p) ? p : null;
}

/** Downloads one file (or finds it in the cache) and returns its path in the snapshot folder. */
export async function hubDownloadFile(
  repo: string,
  file: string,
  opts: HubOptions & { revision?: string } = {},
): Promise<string> {
  const s = settings(opts);
  const revision = opts.revision ?? 'main';
  const uri = `hf://${repo}/${file}`;
  checkRelPath(file, 'path', uri);
  checkRelPath(revision, 'revision', uri);
  const repoDir = repoCacheDir(repo, s.cacheDir);
  const cached = cachedFile(repoDir, revision, file);
  if (s.offline) {
    if (cached) return cached;
    throw offlineMiss(repo, file, revision, s, 'offline (HF_HUB_OFFLINE=1)');
  }
  if (cached && !s.refresh) return cached;

  let meta: FileMeta;
  try {
    meta = await fileMeta(s, repo, revision, file);
  } catch (e) {
    if (cached && e instanceof HubUnreachableError) return cached;
    throw e;
  }
  const what = `hf://${repo}/${file}`;
  const blobs = path.join(repoDir, 'blobs');
  const blob = path.join(blobs, meta.etag);
  const snap = path.join(repoDir, 'snapshots', meta.commit, file);
  if (!fs.existsSync(blob)) {
    await fsp.mkdir(blobs, { recursive: true });
    const incomplete = `${blob}.incomplete`;
    const digest = await downloadBlob(s, meta, incomplete, what);
    if (SHA256_RE.test(meta.etag) && digest !== meta.etag) {
      await fsp.rm(incomplete, { force: true });
      throw new HubError(
        `${what}: checksum mismatch: the Hub says sha256 ${meta.etag} but the downloaded bytes hash to ${digest}; ` +
          'the download was corrupted (the partial file was removed): run again',
      );
    }
    await fsp.rename(incomplete, blob);
  }
  await linkSnapshot(blob, snap);
  await writeRef(repoDir, revision, meta.commit);
  return snap;
}

/** Top-level files of a model snapshot that lowrank needs besides the weights. */
const SIDE_FILES = new Set([
  'config.json',
  'generation_config.json',
  'tokenizer.json',
  'tokenizer_config.json',
  'tokenizer.model',
  'special_tokens_map.json',
  'added_tokens.json',
  'vocab.json',
  'merges.txt',
  'chat_template.json',
  'chat_template.jinja',
  'adapter_config.json',
]);

function readJson(p: string): unknown {
  try {
    return JSON.parse(fs.readFileSync(p, 'utf8'));
  } catch {
    return null;
  }
}

function shardsOf(indexPath: string): string[] | null {
  const j = readJson(indexPath) as { weight_map?: Record<string, unknown> } | null;
  if (!j || typeof j.weight_map !== 'object' || j.weight_map === null) return null;
  const files = new Set<string>();
  for (const v of Object.values(j.weight_map)) {
    if (typeof v !== 'string' || v.includes('/') || v.includes('\\') || v === '..' || v === '.') return null;
    files.add(v);
  }
  return [...files];
}

/** Whether a snapshot folder holds a usable model or adapter (config plus complete safetensors weights). */
function snapshotComplete(dir: string): boolean {
  if (!fs.existsSync(path.join(dir, 'config.json')) && !fs.existsSync(path.join(dir, 'adapter_config.json')))
    return false;
  const index = path.join(dir, 'model.safetensors.index.json');
  if (fs.existsSync(index)) {
    const shards = shardsOf(index);
    return shards?.every((f) => fs.existsSync(path.join(dir, f))) ?? false;
  }
  return fs.readdirSync(dir).some((f) => f.endsWith('.safetensors') && fs.existsSync(path.join(dir, f)));
}

/**
 * Downloads what a model or adapter needs (config, tokenizer files, safetensors weights and index) for a revision
 * and returns the snapshot folder. A complete cached snapshot is used without any request unless `refresh`.
 */
export async function hubSnapshot(repo: string, opts: HubOptions & { revision?: string } = {}): Promise<string> {
  const s = settings(opts);
  const revision = opts.revision ?? 'main';
  checkRelPath(revision, 'revision', `hf://${repo}`);
  const repoDir = repoCacheDir(repo, s.cacheDir);
  const commit = readRef(repoDir, revision);
  const cachedDir = commit ? path.join(repoDir, 'snapshots', commit) : null;
  const cachedOk = cachedDir !== null && fs.existsSync(cachedDir) && snapshotComplete(cachedDir);
  if (s.offline) {
    if (cachedOk) return cachedDir;
    throw offlineMiss(repo, null, revision, s, 'offline (HF_HUB_OFFLINE=1)');
  }
  if (cachedOk && !s.refresh) return cachedDir;

  const what = `hf://${repo}@${revision}`;
  const url = `${s.endpoint}/api/models/${repo}/revision/${encodeURIComponent(revision)}`;
  let res: Response;
  try {
    res = await request(s, url, { headers: headers(s) }, what);
  } catch (e) {
    if (cachedOk && e instanceof HubUnreachableError) return cachedDir;
    throw e;
  }
  if (!res.ok) {
    await res.body?.cancel();
    throw new HubError(describeStatus(res.status, what, s));
  }
  const info = (await res.json().catch(() => null)) as { sha?: unknown; siblings?: unknown } | null;
  if (!info || typeof info.sha !== 'string' || !COMMIT_RE.test(info.sha) || !Array.isArray(info.siblings)) {
    throw new HubError(`${what}: unexpected answer from ${url} (no sha and siblings)`);
  }
  const sha = info.sha;
  const files = info.siblings
    .map((x) => (x as { rfilename?: unknown }).rfilename)
    .filter((f): f is string => typeof f === 'string' && !f.includes('/'));
  const dl = (f: string) => hubDownloadFile(repo, f, { ...opts, revision: sha, offline: false, refresh: false });

  for (const f of files) if (SIDE_FILES.has(f)) await dl(f);
  const snapDir = path.join(repoDir, 'snapshots', sha);
  let weights: string[];
  if (files.includes('model.safetensors.index.json')) {
    const idx = await dl('model.safetensors.index.json');
    const shards = shardsOf(idx);
    if (!shards) throw new HubError(`${what}: model.safetensors.index.json has no valid weight_map`);
    weights = shards;
  } else if (files.includes('model.safetensors')) weights = ['model.safetensors'];
  else if (files.includes('adapter_model.safetensors')) weights = ['adapter_model.safetensors'];
  else weights = files.filter((f) => f.endsWith('.safetensors'));
  if (weights.length === 0) {
    const ggufs = files.filter((f) => f.endsWith('.gguf'));
    throw new HubError(
      `${what} has no safetensors weights${ggufs.length ? `; it has GGUF files: use hf://${repo}/${ggufs[0]}` : ' (only .bin checkpoints are not supported: convert them to safetensors)'}`,
    );
  }
  for (const f of weights) await dl(f);
  await writeRef(repoDir, revision, sha);
  return snapDir;
}

/** Resolves an hf:// reference to a local file (with a path) or snapshot folder (without). */
export async function resolveHubUri(uri: string, opts: HubOptions = {}): Promise<string> {
  const ref = parseHubUri(uri);
  return ref.path === null
    ? hubSnapshot(ref.repo, { ...opts, revision: ref.revision })
    : hubDownloadFile(ref.repo, ref.path, { ...opts, revision: ref.revision });
}
