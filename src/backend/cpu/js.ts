// The TypeScript reference backend: every kernel family's reference implementation in one object.

import type { Backend } from '../backend.ts';
import { jsCoreKernels } from './js-core.ts';

export const jsBackend: Backend = {
  ...jsCoreKernels,
};
