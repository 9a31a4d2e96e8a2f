// Lifetime scopes: `tidy(fn)` disposes every tensor created inside fn except what fn returns or what was
// passed to keep(). Scopes nest; returned tensors move to the enclosing scope.

export interface Disposable {
  dispose(): void;
  readonly disposed: boolean;
  kept: boolean;
}

const stack: Set<Disposable>[] = [];

/** Called by Tensor's constructor: the tensor belongs to the innermost open scope, if any. */
export function track(t: Disposable): void {
  const top = stack[stack.length - 1];
  if (top) top.add(t);
}

/** Excludes t from disposal by any scope (the caller owns it and disposes it). */
export function keep<T extends Disposable>(t: T): T {
  t.kept = true;
  for (const s of stack) s.delete(t);
  return t;
}

function collect(value: unknown, out: Set<Disposable>, depth = 0): void {
  if (value === null || typeof value !== 'object' || depth > 4) return;
  if ('dispose' in value && 'disposed' in value && 'kept' in value) {
    out.add(value as Disposable);
    return;
  }
  if (Array.isArray(value)) for (const v of value) collect(v, out, depth + 1);
  else if (value instanceof Map) for (const v of value.values()) collect(v, out, depth + 1);
  else if (Object.getPrototypeOf(value) === Object.prototype)
    for (const v of Object.values(value)) collect(v, out, depth + 1);
}

/** Ends a scope: disposes what it tracked except the result's tensors and kept ones, which move up. */
function closeScope(scope: Set<Disposable>, result: unknown): void {
  const survivors = new Set<Disposable>();
  collect(result, survivors);
  const parent = stack[stack.length - 1];
  for (const t of scope) {
    if (survivors.has(t) || t.kept) {
      if (parent && !t.kept) parent.add(t);
    } else t.dispose();
  }
}

export function tidy<T>(fn: () => T): T {
  const scope = new Set<Disposable>();
  stack.push(scope);
  let result: T;
  try {
    result = fn();
  } catch (e) {
    stack.pop();
    for (const t of scope) if (!t.kept) t.dispose();
    throw e;
  }
  stack.pop();
  closeScope(scope, result);
  return result;
}

/** Async variant: the scope stays open across awaits, so only use it where no other work interleaves. */
export async function tidyAsync<T>(fn: () => Promise<T>): Promise<T> {
  const scope = new Set<Disposable>();
  stack.push(scope);
  let result: T;
  try {
    result = await fn();
  } catch (e) {
    stack.splice(stack.lastIndexOf(scope), 1);
    for (const t of scope) if (!t.kept) t.dispose();
    throw e;
  }
  stack.splice(stack.lastIndexOf(scope), 1);
  closeScope(scope, result);
  return result;
}
