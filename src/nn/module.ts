// Module: a tree of named parameters and children, named like PyTorch modules so that checkpoints and
// PEFT adapters address them by the same dotted paths (model.layers.0.self_attn.q_proj.weight).

import { fmtShape, ShapeError } from '../core/errors.ts';
import { keep } from '../core/scope.ts';
import { sameShape, type Tensor } from '../core/tensor.ts';

export abstract class Module {
  /** Bumped whenever any module registers or replaces a parameter or child (cached plans compare it). */
  static structureVersion = 0;
  private readonly _params = new Map<string, Tensor | null>();
  private readonly _children = new Map<string, Module>();
  training = false;

  /** Registers (or replaces) a parameter. The module owns it: it is kept out of every tidy scope. */
  protected param(name: string, t: Tensor | null, requiresGrad = false): Tensor | null {
    const old = this._params.get(name);
    if (old && old !== t) old.dispose();
    if (t) {
      keep(t);
      t.requiresGrad = requiresGrad;
      t.name ??= name;
    }
    this._params.set(name, t);
    Module.structureVersion++;
    return t;
  }

  /** Registers (or replaces) a child module. */
  child<M extends Module>(name: string, m: M): M {
    this._children.set(name, m);
    Module.structureVersion++;
    return m;
  }

  getParam(name: string): Tensor | null {
    return this._params.get(name) ?? null;
  }

  /** Replaces a registered parameter's tensor, checking the shape (loading weights). */
  setParam(name: string, t: Tensor): void {
    const old = this._params.get(name);
    if (old === undefined) throw new ShapeError(`${this.constructor.name} has no parameter '${name}'`);
    if (old && !sameShape(old.shape, t.shape))
      throw new ShapeError(`parameter '${name}': expected ${fmtShape(old.shape)}, got ${fmtShape(t.shape)}`);
    this.param(name, t, old?.requiresGrad ?? false);
  }

  getChild(name: string): Module | undefined {
    return this._children.get(name);
  }

  *namedChildren(): Iterable<[string, Module]> {
    yield* this._children;
  }

  *namedModules(prefix = ''): Iterable<[string, Module]> {
    yield [prefix, this];
    for (const [n, c] of this._children) yield* c.namedModules(prefix ? `${prefix}.${n}` : n);
  }

  *namedParameters(prefix = ''): Iterable<[string, Tensor]> {
    for (const [n, p] of this._params) if (p) yield [prefix ? `${prefix}.${n}` : n, p];
    for (const [n, c] of this._children) yield* c.namedParameters(prefix ? `${prefix}.${n}` : n);
  }

  parameters(): Tensor[] {
    return [...this.namedParameters()].map(([, p]) => p);
  }

  trainableParameters(): [string, Tensor][] {
    return [...this.namedParameters()].filter(([, p]) => p.requiresGrad);
  }

  /** The module at a dotted path, or undefined. */
  getModule(path: string): Module | undefined {
    if (path === '') return this;
    let m: Module | undefined = this;
    for (const part of path.split('.')) {
      m = m?.getChild(part);
      if (!m) return undefined;
    }
    return m;
  }

  /** Replaces the module at a dotted path (used by adapter injection). */
  setModule(path: string, m: Module): void {
    const i = path.lastIndexOf('.');
    const parent = i < 0 ? this : this.getModule(path.slice(0, i));
    if (!parent) throw new ShapeError(`no module at '${path.slice(0, i)}'`);
    parent.child(i < 0 ? path : path.slice(i + 1), m);
  }

  /** Sets training mode (dropout on) recursively. */
  train(on = true): this {
    for (const [, m] of this.namedModules()) m.training = on;
    return this;
  }
  eval(): this {
    return this.train(false);
  }

  /** Freezes or unfreezes every parameter. */
  requiresGrad(on: boolean): this {
    for (const p of this.parameters()) p.requiresGrad = on;
    return this;
  }

  zeroGrad(): void {
    for (const p of this.parameters()) {
      p.grad?.dispose();
      p.grad = null;
    }
  }

  /** Frees every parameter. */
  dispose(): void {
    for (const p of this.parameters()) p.dispose();
  }

  numParameters(trainableOnly = false): number {
    let n = 0;
    for (const [, p] of this.namedParameters()) if (!trainableOnly || p.requiresGrad) n += p.size;
    return n;
  }
}

/** An ordered list of modules named 0, 1, 2, ... */
export class ModuleList<M extends Module> extends Module {
  readonly length: number;
  constructor(items: M[]) {
    super();
    this.length = items.length;
    items.forEach((m, i) => {
      this.child(String(i), m);
    });
  }
  get items(): M[] {
    return Array.from({ length: this.length }, (_, i) => this.at(i));
  }
  at(i: number): M {
    return this.getChild(String(i)) as M;
  }
}
