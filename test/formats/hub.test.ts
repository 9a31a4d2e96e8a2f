// A fake Hugging Face Hub on 127.0.0.1 (random port): resolve URLs with x-repo-commit and etags, LFS files behind
// a redirect with x-linked-etag / x-linked-size, Range support, and the model-info API. Nothing else is contacted.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ConfigError } from '../../src/core/errors.ts';
import {
  HubError,
  type HubOptions,
  hubCacheDir,
  hubDownloadFile,
  hubSnapshot,
  parseHubUri,
  repoCacheDir,
  resolveHubUri,
} from '../../src/formats/hub.ts';
import {
  fromFloat32,
  openSafetensors,
  openSafetensorsIndex,
  serializeSafetensors,
} from '../../src/formats/safetensors.ts';

const sha1 = (s: string | Uint8Array) => createHash('sha1').update(s).digest('hex');
const sha256 = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

interface RepoFile {
  content: Uint8Array;
  lfs: boolean;
  /** Served instead of `content` (to simulate corruption in transit). */
  served?: Uint8Array;
}
interface Repo {
  commit: string;
  files: Record<string, RepoFile>;
  gated?: boolean;
}

const weights = serializeSafetensors({
  'model.embed_tokens.weight': fromFloat32(
    Float32Array.from({ length: 40000 }, (_, i) => Math.sin(i)),
    [200, 200],
  ),
});
const shard1 = serializeSafetensors({ 'a.weight': fromFloat32([1, 2, 3], [3]) });
const shard2 = serializeSafetensors({ 'b.weight': fromFloat32([4, 5], [2]) });
const text = (s: string) => new Uint8Array(Buffer.from(s));

const REPOS: Record<string, Repo> = {
  'acme/tiny': {
    commit: sha1('tiny-commit-1'),
    files: {
      'config.json': { content: text('{"model_type":"llama"}'), lfs: false },
      'tokenizer.json': { content: text('{"version":"1.0"}'), lfs: false },
      'README.md': { content: text('# tiny'), lfs: false },
      'model.safetensors': { content: weights, lfs: true },
      'original/consolidated.safetensors': { content: weights, lfs: true },
      'sub/dir/notes.txt': { content: text('nested'), lfs: false },
    },
  },
  'acme/sharded': {
    commit: sha1('sharded-commit-1'),
    files: {
      'config.json': { content: text('{}'), lfs: false },
      'model.safetensors.index.json': {
        content: text(
          JSON.stringify({
            metadata: { total_size: 20 },
            weight_map: {
              'a.weight': 'model-00001-of-00002.safetensors',
              'b.weight': 'model-00002-of-00002.safetensors',
            },
          }),
        ),
        lfs: false,
      },
      'model-00001-of-00002.safetensors': { content: shard1, lfs: true },
      'model-00002-of-00002.safetensors': { content: shard2, lfs: true },
    },
  },
  'acme/broken': {
    commit: sha1('broken-commit-1'),
    files: {
      'model.safetensors': { content: weights, served: weights.map((b, i) => (i === 100 ? b ^ 1 : b)), lfs: true },
    },
  },
  'acme/gated': { commit: sha1('gated'), gated: true, files: { 'config.json': { content: text('{}'), lfs: false } } },
};

interface Req {
  method: string;
  url: string;
  range?: string;
  auth?: string;
}
const requests: Req[] = [];
let server: http.Server;
let endpoint = '';

function blobEtag(f: RepoFile): string {
  return f.lfs ? sha256(f.content) : sha1(f.content);
}

function handle(req: http.IncomingMessage, res: http.ServerResponse): void {
  const url = new URL(req.url!, 'http://127.0.0.1');
  requests.push({ method: req.method!, url: url.pathname, range: req.headers.range, auth: req.headers.authorization });
  const parts = url.pathname.split('/').filter(Boolean).map(decodeURIComponent);
  // /api/models/{owner}/{name}/revision/{rev}
  if (parts[0] === 'api' && parts[1] === 'models' && parts[4] === 'revision') {
    const repo = REPOS[`${parts[2]}/${parts[3]}`];
    if (!repo || (parts[5] !== 'main' && parts[5] !== repo.commit)) return void res.writeHead(404).end();
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(
      JSON.stringify({ sha: repo.commit, siblings: Object.keys(repo.files).map((rfilename) => ({ rfilename })) }),
    );
    return;
  }
  // /cdn/{owner}/{name}/{path...}: the LFS storage, with Range support
  if (parts[0] === 'cdn') {
    const repo = REPOS[`${parts[1]}/${parts[2]}`]!;
    const f = repo.files[parts.slice(3).join('/')]!;
    const body = f.served ?? f.content;
    const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
    if (m) {
      const start = Number(m[1]);
      if (start >= body.byteLength) return void res.writeHead(416).end();
      res.writeHead(206, {
        'content-length': body.byteLength - start,
        'content-range': `bytes ${start}-${body.byteLength - 1}/${body.byteLength}`,
      });
      return void res.end(body.subarray(start));
    }
    res.writeHead(200, { 'content-length': body.byteLength });
    return void res.end(body);
  }
  // /{owner}/{name}/resolve/{rev}/{path...}
  const repo = REPOS[`${parts[0]}/${parts[1]}`];
  if (!repo || parts[2] !== 'resolve') return void res.writeHead(404).end();
  if (repo.gated && req.headers.authorization !== 'Bearer good-token') return void res.writeHead(401).end();
  if (parts[3] !== 'main' && parts[3] !== repo.commit) return void res.writeHead(404).end();
  const file = parts.slice(4).join('/');
  const f = repo.files[file];
  if (!f) return void res.writeHead(404, { 'x-repo-commit': repo.commit }).end();
  if (f.lfs) {
    res.writeHead(302, {
      location: `/cdn/${parts[0]}/${parts[1]}/${file}`,
      'x-repo-commit': repo.commit,
      'x-linked-etag': `"${blobEtag(f)}"`,
      'x-linked-size': String(f.content.byteLength),
      etag: '"not-the-blob"',
    });
    return void res.end();
  }
  res.writeHead(200, {
    'x-repo-commit': repo.commit,
    etag: `"${blobEtag(f)}"`,
    'content-length': f.content.byteLength,
  });
  res.end(req.method === 'HEAD' ? undefined : f.content);
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lowrank-hub-'));
let caseNo = 0;
function opts(extra: HubOptions = {}): HubOptions & { cacheDir: string } {
  return {
    cacheDir: path.join(tmp, `cache${caseNo++}`),
    endpoint,
    progress: false,
    offline: false,
    token: undefined,
    ...extra,
  };
}

before(async () => {
  server = http.createServer(handle);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
after(async () => {
  await new Promise<void>((resolve) => server.close(() => resolve()));
  fs.rmSync(tmp, { recursive: true, force: true });
});

describe('hf:// references and the cache folder', () => {
  test('parseHubUri', () => {
    assert.deepEqual(parseHubUri('hf://acme/tiny'), { repo: 'acme/tiny', revision: 'main', path: null });
    assert.deepEqual(parseHubUri('hf://acme/tiny/'), { repo: 'acme/tiny', revision: 'main', path: null });
    assert.deepEqual(parseHubUri('hf://acme/tiny/sub/model.gguf'), {
      repo: 'acme/tiny',
      revision: 'main',
      path: 'sub/model.gguf',
    });
    assert.deepEqual(parseHubUri('hf://acme/tiny@v1.0/config.json'), {
      repo: 'acme/tiny',
      revision: 'v1.0',
      path: 'config.json',
    });
    assert.deepEqual(parseHubUri('hf://acme/tiny@refs%2Fpr%2F3'), {
      repo: 'acme/tiny',
      revision: 'refs/pr/3',
      path: null,
    });
    for (const bad of [
      'acme/tiny',
      'hf://acme',
      'hf://acme/tiny/../x',
      'hf://ac me/tiny',
      'hf://acme/tiny@',
      'hf://acme/tiny@..%2F..',
    ]) {
      assert.throws(() => parseHubUri(bad), ConfigError, bad);
    }
  });

  test('hubCacheDir follows HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME', () => {
    assert.equal(hubCacheDir({ HF_HUB_CACHE: '/c/hub', HF_HOME: '/h' }), '/c/hub');
    assert.equal(hubCacheDir({ HF_HOME: '/h' }), path.join('/h', 'hub'));
    assert.equal(hubCacheDir({ XDG_CACHE_HOME: '/x' }), path.join('/x', 'huggingface', 'hub'));
    assert.equal(hubCacheDir({}), path.join(os.homedir(), '.cache', 'huggingface', 'hub'));
    assert.equal(repoCacheDir('acme/tiny', '/c'), path.join('/c', 'models--acme--tiny'));
  });
});

describe('downloads from a fake hub on 127.0.0.1', () => {
  test('an LFS file: HEAD + GET, blob named by sha256, relative symlink, refs/main, Bearer token', async () => {
    const o = opts({ token: 'tok123' });
    const n0 = requests.length;
    const p = await hubDownloadFile('acme/tiny', 'model.safetensors', o);
    const repoDir = repoCacheDir('acme/tiny', o.cacheDir);
    const commit = REPOS['acme/tiny']!.commit;
    assert.equal(p, path.join(repoDir, 'snapshots', commit, 'model.safetensors'));
    assert.ok(fs.readFileSync(p).equals(weights));
    assert.equal(fs.readlinkSync(p), path.join('..', '..', 'blobs', sha256(weights)));
    assert.equal(fs.readFileSync(path.join(repoDir, 'refs', 'main'), 'utf8'), commit);
    const mine = requests.slice(n0);
    assert.deepEqual(
      mine.map((r) => r.method),
      ['HEAD', 'GET', 'GET'],
    );
    assert.ok(mine.every((r) => r.auth === 'Bearer tok123'));
    assert.equal(mine[2]!.url, '/cdn/acme/tiny/model.safetensors');
    // cache hit: no request at all
    const n1 = requests.length;
    assert.equal(await hubDownloadFile('acme/tiny', 'model.safetensors', o), p);
    assert.equal(await resolveHubUri('hf://acme/tiny/model.safetensors', o), p);
    assert.equal(requests.length, n1);
    // refresh asks again (HEAD only: the blob is already there)
    assert.equal(await hubDownloadFile('acme/tiny', 'model.safetensors', { ...o, refresh: true }), p);
    assert.deepEqual(
      requests.slice(n1).map((r) => r.method),
      ['HEAD'],
    );
    openSafetensors(p).close();
  });

  test('a nested non-LFS file and a pinned commit', async () => {
    const o = opts();
    const commit = REPOS['acme/tiny']!.commit;
    const p = await resolveHubUri(`hf://acme/tiny@${commit}/sub/dir/notes.txt`, o);
    assert.equal(fs.readFileSync(p, 'utf8'), 'nested');
    assert.ok(p.endsWith(path.join(commit, 'sub', 'dir', 'notes.txt')));
    assert.ok(!fs.existsSync(path.join(repoCacheDir('acme/tiny', o.cacheDir), 'refs', commit)));
  });

  test('resume: an existing .incomplete is continued with a Range request', async () => {
    const o = opts();
    const blobs = path.join(repoCacheDir('acme/tiny', o.cacheDir), 'blobs');
    fs.mkdirSync(blobs, { recursive: true });
    const half = Math.floor(weights.byteLength / 2);
    fs.writeFileSync(path.join(blobs, `${sha256(weights)}.incomplete`), weights.subarray(0, half));
    const n0 = requests.length;
    const p = await hubDownloadFile('acme/tiny', 'model.safetensors', o);
    assert.ok(fs.readFileSync(p).equals(weights));
    const gets = requests.slice(n0).filter((r) => r.method === 'GET');
    assert.equal(gets.at(-1)!.range, `bytes=${half}-`);
    assert.deepEqual(fs.readdirSync(blobs), [sha256(weights)]);
  });

  test('a complete .incomplete (server answers 416) is verified and kept', async () => {
    const o = opts();
    const blobs = path.join(repoCacheDir('acme/tiny', o.cacheDir), 'blobs');
    fs.mkdirSync(blobs, { recursive: true });
    fs.writeFileSync(path.join(blobs, `${sha256(weights)}.incomplete`), weights);
    const p = await hubDownloadFile('acme/tiny', 'model.safetensors', o);
    assert.ok(fs.readFileSync(p).equals(weights));
  });

  test('checksum mismatch is a HubError; nothing corrupt is left in the cache', async () => {
    const o = opts();
    await assert.rejects(hubDownloadFile('acme/broken', 'model.safetensors', o), (e: unknown) => {
      assert.ok(e instanceof HubError);
      assert.match(e.message, /checksum mismatch/);
      assert.match(e.message, /hf:\/\/acme\/broken\/model\.safetensors/);
      return true;
    });
    const repoDir = repoCacheDir('acme/broken', o.cacheDir);
    assert.deepEqual(fs.readdirSync(path.join(repoDir, 'blobs')), []);
    assert.ok(!fs.existsSync(path.join(repoDir, 'snapshots')));
  });

  test('offline: the cache only, with a clear error when the file is not there', async () => {
    const o = opts();
    const p = await hubDownloadFile('acme/tiny', 'config.json', o);
    const n0 = requests.length;
    assert.equal(await hubDownloadFile('acme/tiny', 'config.json', { ...o, offline: true, refresh: true }), p);
    const env = { HF_HUB_OFFLINE: '1', HF_HUB_CACHE: o.cacheDir, HF_ENDPOINT: endpoint };
    assert.equal(await resolveHubUri('hf://acme/tiny/config.json', { env, progress: false }), p);
    await assert.rejects(resolveHubUri('hf://acme/tiny/tokenizer.json', { env, progress: false }), (e: unknown) => {
      assert.ok(e instanceof HubError);
      assert.match(e.message, /offline/);
      assert.match(e.message, /hf:\/\/acme\/tiny\/tokenizer\.json/);
      return true;
    });
    await assert.rejects(resolveHubUri('hf://acme/other', { env, progress: false }), /acme\/other.*not in the cache/);
    assert.equal(requests.length, n0);
  });

  test('HTTP errors: 404 and 401 are HubErrors with a hint', async () => {
    await assert.rejects(hubDownloadFile('acme/tiny', 'missing.json', opts()), /not found \(HTTP 404\)/);
    await assert.rejects(hubDownloadFile('acme/nope', 'config.json', opts()), HubError);
    await assert.rejects(hubDownloadFile('acme/gated', 'config.json', opts()), /HF_TOKEN/);
    const p = await hubDownloadFile('acme/gated', 'config.json', opts({ token: 'good-token' }));
    assert.equal(fs.readFileSync(p, 'utf8'), '{}');
  });

  test('unreachable endpoint: a HubError that suggests offline mode', async () => {
    const dead = http.createServer();
    await new Promise<void>((r) => dead.listen(0, '127.0.0.1', r));
    const port = (dead.address() as AddressInfo).port;
    await new Promise<void>((r) => dead.close(() => r()));
    const deadEndpoint = `http://127.0.0.1:${port}`;
    await assert.rejects(
      hubDownloadFile('acme/tiny', 'config.json', opts({ endpoint: deadEndpoint })),
      /cannot reach .*HF_HUB_OFFLINE=1/,
    );
    // with a cached copy, a refresh that cannot reach the Hub falls back to the cache
    const o = opts();
    const p = await hubDownloadFile('acme/tiny', 'config.json', o);
    assert.equal(await hubDownloadFile('acme/tiny', 'config.json', { ...o, endpoint: deadEndpoint, refresh: true }), p);
  });
});

describe('whole-model snapshots', () => {
  test('hf://owner/repo downloads config, tokenizer and weights, not other files; then a cache hit', async () => {
    const o = opts();
    const dir = await resolveHubUri('hf://acme/tiny', o);
    assert.equal(dir, path.join(repoCacheDir('acme/tiny', o.cacheDir), 'snapshots', REPOS['acme/tiny']!.commit));
    assert.deepEqual(fs.readdirSync(dir).sort(), ['config.json', 'model.safetensors', 'tokenizer.json']);
    const n0 = requests.length;
    assert.equal(await resolveHubUri('hf://acme/tiny', o), dir);
    assert.equal(await resolveHubUri('hf://acme/tiny', { ...o, offline: true }), dir);
    assert.equal(requests.length, n0);
  });

  test('a sharded model: index and every shard', async () => {
    const o = opts();
    const dir = await hubSnapshot('acme/sharded', o);
    assert.deepEqual(fs.readdirSync(dir).sort(), [
      'config.json',
      'model-00001-of-00002.safetensors',
      'model-00002-of-00002.safetensors',
      'model.safetensors.index.json',
    ]);
    const r = openSafetensorsIndex(dir);
    assert.deepEqual(r.names(), ['a.weight', 'b.weight']);
    r.close();
    await assert.rejects(hubSnapshot('acme/sharded', { ...o, revision: 'v9' }), /not found/);
    await assert.rejects(hubSnapshot('acme/sharded', { ...o, revision: 'v9', offline: true }), /not in the cache/);
  });

  test('all requests went to the loopback fake hub', () => {
    assert.ok(requests.length > 0);
    assert.ok(endpoint.startsWith('http://127.0.0.1:'));
  });
});
