// The seeded choices the example data generators make. Built on the project's Rng (xoshiro128**), so the
// same seed gives the same files on every machine.

import { Rng } from '../src/core/rng.ts';

export class Picker {
  private readonly rng: Rng;
  constructor(seed: number) {
    this.rng = new Rng(seed);
  }
  /** A uniform integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + this.rng.int(hi - lo + 1);
  }
  pick<T>(items: readonly T[]): T {
    return items[this.rng.int(items.length)]!;
  }
  /** True with probability p. */
  chance(p: number): boolean {
    return this.rng.uniform() < p;
  }
  /** k distinct items in a random order. */
  sample<T>(items: readonly T[], k: number): T[] {
    const a = [...items];
    for (let i = a.length - 1; i > 0; i--) {
      const j = this.rng.int(i + 1);
      [a[i], a[j]] = [a[j]!, a[i]!];
    }
    return a.slice(0, k);
  }
}

/** Records as JSON Lines (one record per line, a final newline). */
export function toJsonl(records: readonly unknown[]): string {
  return records.map((r) => JSON.stringify(r)).join('\n') + '\n';
}
