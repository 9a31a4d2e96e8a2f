// Reverse-mode autograd on a tape. Each op that has an input requiring a gradient records one GradNode on
// its output; backward() walks the nodes in reverse topological order, frees what each saved as soon as it
// has run, and accumulates gradients into leaves. Inputs that do not require a gradient (frozen weights)
// are marked `needs = false`, and ops skip computing their gradient entirely.

import { getBackend } from '../backend/index.ts';
import { fmtShape, LowrankError, ShapeError } from '../core/errors.ts';
import { keep, tidy } from '../core/scope.ts';
import { type GradNode, sameShape, type Tensor } from '../core/tensor.ts';
import { empty, emptyForOutput } from './create.ts';

let gradEnabled = true;

export function isGradEnabled(): boolean {
  return gradEnabled;
}

/** Runs fn without recording anything on the tape (inference, optimizer updates). */
export function noGrad<T>(fn: () => T): T {
  const prev = gradEnabled;
  gradEnabled = false;
  try {
    return fn();
  } finally {
    gradEnabled = prev;
  }
}

/** Runs fn with recording switched on (e.g. a recomputed checkpointed segment inside backward). */
export function enableGrad<T>(fn: () => T): T {
  const prev = gradEnabled;
  gradEnabled = true;
  try {
    return fn();
  } finally {
    gradEnabled = prev;
  }
}

/** True when recording is on and some input requires a gradient. */
export function needsGrad(...inputs: (Tensor | null | undefined)[]): boolean {
  if (!gradEnabled) return false;
  for (const t of inputs) if (t?.requiresGrad) return true;
  return false;
}

/** A handle on t's storage that no scope disposes; the node releases it. */
export function save(t: Tensor): Tensor {
  return keep(t.view(t.shape, t.strides, t.offset));
}

/**
 * Records an op on the tape (if any input needs a gradient) and returns out.
 * `saved` tensors are retained until the node runs or is released.
 */
export function record(
  out: Tensor,
  op: string,
  inputs: readonly (Tensor | null)[],
  backward: (gradOut: Tensor, needs: readonly boolean[], saved: readonly Tensor[]) => (Tensor | null)[],
  saved: readonly Tensor[] = [],
): Tensor {
  if (!needsGrad(...inputs)) return out;
  let held: Tensor[] | null = saved.map(save);
  const node: GradNode = {
    op,
    inputs,
    backward: (g, needs) => {
      if (!held) throw new LowrankError(`${op}: backward called twice or after release`);
      return backward(g, needs, held);
    },
    release: () => {
      if (held) for (const t of held) t.dispose();
      held = null;
    },
  };
  out.requiresGrad = true;
  out.gradFn = node;
  return out;
}

/** Frees the saved tensors of every node reachable from t (a graph that will not be backpropagated). */
export function releaseGraph(t: Tensor): void {
  for (const u of topoOrder(t)) {
    u.gradFn?.release();
    u.gradFn = null;
  }
}

function topoOrder(root: Tensor): Tensor[] {
  const order: Tensor[] = [];
  const seen = new Set<Tensor>();
  const stack: [Tensor, boolean][] = [[root, false]];
  while (stack.length) {
    const [t, done] = stack.pop()!;
    if (done) {
      order.push(t);
      continue;
    }
    if (seen.has(t) || !t.gradFn) continue;
    seen.add(t);
    stack.push([t, true]);
    for (const i of t.gradFn.inputs) if (i?.gradFn && !seen.has(i)) stack.push([i, false]);
  }
  return order; // children before parents
}

function addInto(acc: Tensor, g: Tensor): void {
  getBackend().binary('add', acc, g, acc);
}

/**
 * Backpropagates from root (a scalar unless gradOut is given). Leaves that require a gradient accumulate
 * it in `.grad` (f32, their shape). The graph is freed as it goes.
 */
export function backward(root: Tensor, gradOut?: Tensor): void {
  if (!root.requiresGrad || !root.gradFn) throw new LowrankError('backward: the tensor does not require a gradient');
  if (!gradOut && root.size !== 1)
    throw new ShapeError(`backward: root ${fmtShape(root.shape)} is not a scalar; pass its gradient`);
  const order = topoOrder(root);
  const grads = new Map<Tensor, Tensor>();
  const g0 = keep(empty(root.shape));
  if (gradOut) getBackend().copy(gradOut, g0);
  else getBackend().fill(g0, 1);
  grads.set(root, g0);
  noGrad(() => {
    for (let k = order.length - 1; k >= 0; k--) {
      const t = order[k]!;
      const node = t.gradFn!;
      const g = grads.get(t);
      grads.delete(t);
      if (!g) {
        node.release();
        t.gradFn = null;
        continue;
      }
      const needs = node.inputs.map((i) => !!i?.requiresGrad);
      const gin = tidy(() => node.backward(g, needs));
      node.release();
      t.gradFn = null;
      // an op may pass its incoming gradient through, or return one tensor for two inputs: each stored
      // gradient must be its own tensor
      const used = new Set<Tensor>();
      for (let i = 0; i < gin.length; i++) {
        let gi = gin[i];
        if (!gi) continue;
        if (gi === g || used.has(gi)) gi = copyOf(gi, false);
        used.add(gi);
        const inp = node.inputs[i];
        if (!inp || !needs[i]) {
          gi.dispose();
          continue;
        }
        if (!sameShape(gi.shape, inp.shape))
          throw new ShapeError(
            `${node.op} backward: gradient ${fmtShape(gi.shape)} does not match input ${i} ${fmtShape(inp.shape)}`,
          );
        if (inp.gradFn) {
          const prev = grads.get(inp);
          if (prev) {
            addInto(prev, gi);
            gi.dispose();
          } else grads.set(inp, keep(gi));
        } else if (inp.grad) {
          addInto(inp.grad, gi);
          gi.dispose();
        } else {
          inp.grad = keep(gi.isContiguous() && gi.dtype === 'f32' ? gi : copyOf(gi, true));
        }
      }
      for (const gi of gin) if (gi && gi !== g && !used.has(gi)) gi.dispose();
      g.dispose();
    }
  });
  for (const g of grads.values()) g.dispose();
}

function copyOf(t: Tensor, disposeSource: boolean): Tensor {
  const out = emptyForOutput(t.shape);
  getBackend().copy(t, out);
  if (disposeSource) t.dispose();
  return out;
}
