// Worker bootstrap: loader hooks are per thread, so the engine worker registers the TypeScript loader
// itself before importing worker.ts.
import { register } from 'tsx/esm/api';

register();
await import('./worker.ts');
