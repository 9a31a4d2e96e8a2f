// Builds the native CPU addon (native/) with node-gyp during `npm ci` / `npm install`.
// A failed build is not fatal: lowrank then runs on its TypeScript kernels and says so once.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const force = process.argv.includes('--force');
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
const r = spawnSync(process.execPath, [gyp, 'rebuild', '-j', 'max'], { cwd: join(root, 'native'), stdio: 'inherit' });
if (r.status !== 0) console.warn('lowrank: the native addon did not build; lowrank will use the TypeScript kernels');
