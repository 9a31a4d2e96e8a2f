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

/**
 * Draws a training and an evaluation set from one generator; evaluation records never repeat a training
 * record (or each other), so evaluation measures generalisation rather than recall.
 */
export function makeSplits<T>(
  p: Picker,
  make: (p: Picker) => T,
  trainCount: number,
  evalCount: number,
): { train: T[]; eval: T[] } {
  const train = Array.from({ length: trainCount }, () => make(p));
  const seen = new Set(train.map((r) => JSON.stringify(r)));
  const evalSet: T[] = [];
  for (let tries = 0; evalSet.length < evalCount; tries++) {
    if (tries > evalCount * 100)
      throw new Error('makeSplits: the generator repeats itself too much for a disjoint eval set');
    const r = make(p);
    const key = JSON.stringify(r);
    if (seen.has(key)) continue;
    seen.add(key);
    evalSet.push(r);
  }
  return { train, eval: evalSet };
}
