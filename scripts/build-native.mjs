// Builds the native CPU addon (native/) with node-gyp during `npm ci` / `npm install`.
// A failed build is not fatal: lowrank then runs on its TypeScript kernels and says so once.
//
//   node scripts/build-native.mjs            build unless native/build/Release/lowrank_native.node exists
//   node scripts/build-native.mjs --force    (npm run build:native) configure and build incrementally
//   node scripts/build-native.mjs --clean    delete native/build first (node-gyp rebuild)
//
// Builds of one checkout take a lock, so concurrent builds (several npm scripts, several shells) run one after
// the other instead of deleting each other's files. An incremental build replaces the .node file only at its
// end, so processes loading the addon meanwhile still find the previous one.
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const clean = process.argv.includes('--clean');
const force = clean || process.argv.includes('--force');
if (!existsSync(join(root, 'native', 'binding.gyp'))) process.exit(0);
if (process.env.LOWRANK_SKIP_NATIVE === '1') {
  console.log('lowrank: LOWRANK_SKIP_NATIVE=1, not building the native addon');
  process.exit(0);
}
const built = join(root, 'native', 'build', 'Release', 'lowrank_native.node');
if (existsSync(built) && !force) process.exit(0);
let gyp;
try {
  gyp = createRequire(import.meta.url).resolve('node-gyp/bin/node-gyp.js');
} catch {
  console.warn('lowrank: node-gyp is not installed; using the TypeScript kernels');
  process.exit(0);
}

const lock = join(tmpdir(), `lowrank-build-native-${createHash('sha1').update(root).digest('hex').slice(0, 12)}.lock`);

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return e.code === 'EPERM';
  }
}

/** Takes the lock (waiting up to 20 minutes for another build); returns false if locking is impossible. */
function acquire() {
  const start = Date.now();
  let said = false;
  for (;;) {
    try {
      writeFileSync(lock, String(process.pid), { flag: 'wx' });
      return true;
    } catch (e) {
      if (e.code !== 'EEXIST') return false;
    }
    let holder = 0;
    try {
      holder = Number(readFileSync(lock, 'utf8'));
    } catch {
      continue; // released between our two calls
    }
    if (!holder || !alive(holder)) {
      rmSync(lock, { force: true }); // left by a build that died
      continue;
    }
    if (Date.now() - start > 20 * 60_000) return false;
    if (!said) {
      console.log(`lowrank: waiting for another native build (pid ${holder}) to finish`);
      said = true;
    }
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 500);
  }
}

const locked = acquire();
let ok = false;
try {
  const run = (args) =>
    spawnSync(process.execPath, [gyp, ...args], { cwd: join(root, 'native'), stdio: 'inherit' }).status === 0;
  ok = clean ? run(['rebuild', '-j', 'max']) : run(['configure']) && run(['build', '-j', 'max']);
} finally {
  if (locked) rmSync(lock, { force: true });
}
if (!ok) console.warn('lowrank: the native addon did not build; lowrank will use the TypeScript kernels');
