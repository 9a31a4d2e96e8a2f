// The adapter registry on the HTTP thread: which adapter names exist and where their files are. The
// tensors themselves live in the engine worker's cache (adapter-cache.ts), loaded on first use.
//
// Sources: --adapter name=path (startup), a watched directory (--adapter-dir: each subdirectory with an
// adapter_config.json is an adapter named after it; added, changed and removed dirs are picked up), and
// the runtime endpoints (POST /v1/load_lora_adapter, /v1/unload_lora_adapter).
//
// Runtime paths are confined to the configured roots (--adapter-root): a path is resolved with realpath
// (symlinks followed), and it and the files read from it must stay inside a root's realpath, so neither
// `..` nor a symlink can reach other files. Each (re)registration gets a new version, so a replaced adapter
// is never served from a stale cache entry.

import { existsSync, type FSWatcher, readdirSync, realpathSync, statSync, watch } from 'node:fs';
import { isAbsolute, join, relative, resolve, sep } from 'node:path';
import { ConfigError } from '../core/errors.ts';
import { ApiError } from './errors.ts';

export type AdapterSource = 'cli' | 'dir' | 'runtime';

export interface AdapterEntry {
  name: string;
  /** The adapter dir (a realpath). */
  path: string;
  source: AdapterSource;
  version: number;
  /** Unix seconds. */
  created: number;
  /** For dir adapters: a fingerprint of the files, to notice replacements. */
  stamp?: string;
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$/;

/** Files of a PEFT adapter dir that the loader reads. */
const ADAPTER_FILES = ['adapter_config.json', 'adapter_model.safetensors', 'adapter_model.bin'];

let nextVersion = 1;

function inside(root: string, p: string): boolean {
  const rel = relative(root, p);
  return rel === '' || (!rel.startsWith(`..${sep}`) && rel !== '..' && !isAbsolute(rel));
}

/** A fingerprint (sizes and mtimes) of an adapter dir's files. */
function stampOf(dir: string): string {
  return ADAPTER_FILES.map((f) => {
    try {
      const s = statSync(join(dir, f));
      return `${s.size}:${s.mtimeMs}`;
    } catch {
      return '-';
    }
  }).join('|');
}

export interface RegistryEvents {
  /** An adapter's files changed or it went away: drop its cached tensors (all versions but `keep`). */
  onDrop(name: string, keep?: number): void;
}

export class AdapterRegistry {
  private readonly entries = new Map<string, AdapterEntry>();
  private readonly roots: string[];
  private readonly dir: string | null;
  private watcher: FSWatcher | null = null;
  private poll: NodeJS.Timeout | null = null;
  private rescanTimer: NodeJS.Timeout | null = null;

  constructor(
    readonly baseName: string,
    opts: { roots?: string[]; dir?: string | null },
    private readonly events: RegistryEvents,
  ) {
    this.roots = (opts.roots ?? []).map((r) => {
      try {
        return realpathSync(r);
      } catch {
        throw new ConfigError(`--adapter-root ${r}: no such directory`);
      }
    });
    this.dir = null;
    if (opts.dir) {
      try {
        this.dir = realpathSync(opts.dir);
      } catch {
        throw new ConfigError(`--adapter-dir ${opts.dir}: no such directory`);
      }
      if (!statSync(this.dir).isDirectory()) throw new ConfigError(`--adapter-dir ${opts.dir}: not a directory`);
    }
  }

  /** Runtime loading is on when at least one root is configured. */
  get runtimeLoading(): boolean {
    return this.roots.length > 0;
  }

  get(name: string): AdapterEntry | undefined {
    return this.entries.get(name);
  }

  list(): AdapterEntry[] {
    return [...this.entries.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  checkName(name: string, param = 'lora_name'): void {
    if (!NAME.test(name))
      throw new ApiError(
        400,
        `invalid adapter name ${JSON.stringify(name)}: use letters, digits and . _ - : / (at most 128)`,
        {
          param,
        },
      );
    if (name === this.baseName)
      throw new ApiError(400, `'${name}' is the base model's name; choose another adapter name`, { param });
  }

  /** A startup adapter (--adapter name=path): any readable dir. */
  addStatic(name: string, path: string): AdapterEntry {
    try {
      this.checkName(name);
    } catch (e) {
      throw new ConfigError(`--adapter ${name}=${path}: ${(e as Error).message}`);
    }
    if (this.entries.has(name)) throw new ConfigError(`--adapter ${name}: the name is given twice`);
    let real: string;
    try {
      real = realpathSync(path);
    } catch {
      throw new ConfigError(`--adapter ${name}=${path}: no such directory`);
    }
    if (!existsSync(join(real, 'adapter_config.json')))
      throw new ConfigError(`--adapter ${name}=${path}: no adapter_config.json there (expected a PEFT adapter dir)`);
    return this.put(name, real, 'cli');
  }

  /**
   * Resolves a runtime lora_path under the roots: absolute paths must lie inside a root, relative ones are
   * taken relative to each root in turn. Returns the adapter dir's realpath.
   */
  resolveRuntimePath(p: string): string {
    if (!this.runtimeLoading)
      throw new ApiError(403, 'runtime adapter loading is off: start the server with --adapter-root DIR to allow it', {
        code: 'runtime_loading_disabled',
      });
    if (typeof p !== 'string' || p === '' || p.includes('\0') || p.length > 4096)
      throw new ApiError(400, "'lora_path' must be a path", { param: 'lora_path' });
    const candidates = isAbsolute(p) ? [p] : this.roots.map((r) => resolve(r, p));
    const outside = new ApiError(
      400,
      "'lora_path' must name an adapter directory inside one of the server's adapter roots",
      { param: 'lora_path', code: 'path_not_allowed' },
    );
    for (const c of candidates) {
      let real: string;
      try {
        real = realpathSync(c);
      } catch {
        continue;
      }
      const root = this.roots.find((r) => inside(r, real));
      if (!root) throw outside;
      if (!statSync(real).isDirectory())
        throw new ApiError(400, "'lora_path' is not a directory", { param: 'lora_path' });
      // the files read must not escape either (a symlinked adapter_model.safetensors)
      for (const f of ADAPTER_FILES) {
        const fp = join(real, f);
        if (!existsSync(fp)) continue;
        if (!inside(root, realpathSync(fp))) throw outside;
      }
      if (!existsSync(join(real, 'adapter_config.json')))
        throw new ApiError(404, "no adapter_config.json at 'lora_path'", {
          param: 'lora_path',
          code: 'adapter_not_found',
        });
      return real;
    }
    throw new ApiError(404, "'lora_path' does not exist under the adapter roots", {
      param: 'lora_path',
      code: 'adapter_not_found',
    });
  }

  /** Checks that a runtime adapter may take this name: new, or replacing one with `inplace`. */
  checkRuntimeName(name: string, inplace: boolean): void {
    this.checkName(name);
    if (this.entries.has(name) && !inplace)
      throw new ApiError(
        400,
        `The lora adapter '${name}' has already been loaded (use load_inplace: true to replace it)`,
        {
          param: 'lora_name',
          code: 'adapter_exists',
        },
      );
  }

  /** A version for an adapter about to be registered (its cache entries are keyed by it). */
  reserveVersion(): number {
    return nextVersion++;
  }

  /** Registers a runtime adapter (already loaded by the engine under `version`). */
  addRuntime(name: string, realPath: string, inplace: boolean, version: number): AdapterEntry {
    this.checkRuntimeName(name, inplace);
    if (this.entries.has(name)) this.events.onDrop(name, version);
    return this.put(name, realPath, 'runtime', version);
  }

  remove(name: string): AdapterEntry | null {
    const e = this.entries.get(name);
    if (!e) return null;
    this.entries.delete(name);
    this.events.onDrop(name);
    return e;
  }

  /** Scans --adapter-dir now and then on every change (fs.watch, plus a poll as a fallback). */
  watchDir(pollMs = 5000): void {
    if (!this.dir) return;
    this.rescan();
    try {
      this.watcher = watch(this.dir, () => {
        if (this.rescanTimer) return;
        this.rescanTimer = setTimeout(() => {
          this.rescanTimer = null;
          this.rescan();
        }, 100);
      });
      this.watcher.on('error', () => {});
    } catch {
      // some filesystems cannot be watched: the poll below still sees changes
    }
    this.poll = setInterval(() => this.rescan(), pollMs);
    this.poll.unref();
  }

  /** Brings the dir adapters in line with the directory's contents. */
  rescan(): void {
    if (!this.dir) return;
    const seen = new Set<string>();
    let names: string[] = [];
    try {
      names = readdirSync(this.dir);
    } catch {
      names = [];
    }
    for (const name of names) {
      if (!NAME.test(name) || name === this.baseName) continue;
      let real: string;
      try {
        real = realpathSync(join(this.dir, name));
      } catch {
        continue;
      }
      // a symlink out of the watched dir is not followed
      if (!inside(this.dir, real) || !existsSync(join(real, 'adapter_config.json'))) continue;
      if (ADAPTER_FILES.some((f) => existsSync(join(real, f)) && !inside(this.dir!, realpathSync(join(real, f)))))
        continue;
      const old = this.entries.get(name);
      if (old && old.source !== 'dir') continue; // --adapter and runtime names win
      seen.add(name);
      const stamp = stampOf(real);
      if (old && old.stamp === stamp && old.path === real) continue;
      if (old) this.events.onDrop(name);
      this.put(name, real, 'dir', nextVersion++, stamp);
    }
    for (const e of [...this.entries.values()])
      if (e.source === 'dir' && !seen.has(e.name)) {
        this.entries.delete(e.name);
        this.events.onDrop(e.name);
      }
  }

  close(): void {
    this.watcher?.close();
    this.watcher = null;
    if (this.poll) clearInterval(this.poll);
    if (this.rescanTimer) clearTimeout(this.rescanTimer);
    this.poll = null;
  }

  private put(
    name: string,
    path: string,
    source: AdapterSource,
    version = nextVersion++,
    stamp?: string,
  ): AdapterEntry {
    const e: AdapterEntry = {
      name,
      path,
      source,
      version,
      created: Math.floor(Date.now() / 1000),
      ...(stamp ? { stamp } : {}),
    };
    this.entries.set(name, e);
    return e;
  }
}
