// Chooses the active backend: the native CPU addon where it loads, else the TypeScript reference kernels.
// LOWRANK_BACKEND=js|native forces a choice.

import type { Backend } from './backend.ts';
import { jsBackend } from './cpu/js.ts';

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
  return jsBackend;
}

export type { Backend };
export { jsBackend };
