// Chooses the active backend: the native CPU addon where it loads, else the TypeScript reference kernels.
// LOWRANK_BACKEND=js|native forces a choice (js silently; native fails loudly when the addon is missing).
// Falling back to the TypeScript kernels because the addon is missing is said once on stderr.

import type { Backend } from './backend.ts';
import { jsBackend } from './cpu/js.ts';
import { createNativeBackend } from './cpu/native.ts';

let active: Backend | null = null;

export function getBackend(): Backend {
  if (!active) active = chooseBackend();
  return active;
}

/** Replaces the active backend (tests compare backends; the CUDA backend installs itself here). */
export function setBackend(b: Backend): void {
  active = b;
}

function chooseBackend(): Backend {
  const want = process.env.LOWRANK_BACKEND;
  if (want === 'js') return jsBackend;
  const native = createNativeBackend();
  if (native) return native;
  if (want === 'native')
    throw new Error(
      'LOWRANK_BACKEND=native, but the native addon did not load (see the warning above; run `npm run build:native`)',
    );
  return jsBackend;
}

export type { Backend };
export { jsBackend };
