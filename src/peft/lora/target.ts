// Which modules an adapter targets, exactly as PEFT decides it (peft/tuners/tuners_utils.py:
// check_target_module_exists, _maybe_include_all_linear_layers, _find_minimal_target_modules; peft/utils/other.py:
// get_pattern_key, _set_trainable). Keys are module paths of the base model (model.layers.0.self_attn.q_proj).
// PEFT's patterns are Python regexes; pyRegex translates the few syntax differences that matter.

import { ConfigError } from '../../core/errors.ts';
import type { Architecture } from '../../models/config.ts';
import type { LoraConfig } from './config.ts';

/** PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the architectures lowrank runs. */
export const DEFAULT_TARGET_MODULES: Readonly<Record<Architecture, readonly string[]>> = {
  llama: ['q_proj', 'v_proj'],
  mistral: ['q_proj', 'v_proj'],
  qwen2: ['q_proj', 'v_proj'],
  qwen3: ['q_proj', 'v_proj'],
};

/** PEFT's EMBEDDING_LAYER_NAMES. */
export const EMBEDDING_LAYER_NAMES = ['embed_tokens', 'lm_head'];
/** PEFT's MIN_TARGET_MODULES_FOR_OPTIMIZATION. */
export const MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20;
export const ALL_LINEAR = 'all-linear';

const cache = new Map<string, RegExp>();

/** A JS RegExp for a Python `re` pattern (named groups, \A and \Z translated); `wrap` places it in a larger regex. */
export function pyRegex(pattern: string, wrap: (p: string) => string = (p) => p, where = 'pattern'): RegExp {
  const key = `${wrap('\u0000')}\u0001${pattern}`;
  let re = cache.get(key);
  if (!re) {
    const js = pattern
      .replace(/\(\?P<(\w+)>/g, '(?<$1>')
      .replace(/\(\?P=(\w+)\)/g, '\\k<$1>')
      .replace(/\\A/g, '^')
      .replace(/\\Z/g, '$');
    try {
      re = new RegExp(wrap(js));
    } catch (e) {
      throw new ConfigError(`${where}: invalid regular expression ${JSON.stringify(pattern)}: ${(e as Error).message}`);
    }
    cache.set(key, re);
  }
  return re;
}

/** re.fullmatch(pattern, key). */
export function fullMatch(pattern: string, key: string, where = 'target_modules'): boolean {
  return pyRegex(pattern, (p) => `^(?:${p})$`, where).test(key);
}

export type MatchResult = 'match' | 'excluded' | 'unmatched';

/** The module-name matching of check_target_module_exists (exclusions first, then targets and layer indices). */
export function checkTargetModuleExists(cfg: LoraConfig, key: string): MatchResult {
  const ex = cfg.exclude_modules;
  if (ex && (typeof ex === 'string' ? true : ex.length > 0)) {
    if (typeof ex === 'string') {
      if (fullMatch(ex, key, 'exclude_modules')) return 'excluded';
    } else if (ex.includes(key) || ex.some((e) => key.endsWith(`.${e}`))) return 'excluded';
  }
  // never adapt a module that is saved whole (modules_to_save)
  if (cfg.modules_to_save?.length)
    for (const m of cfg.modules_to_save)
      if (pyRegex(m, (p) => `^(^|.*\\.)${p}($|\\..*)`, 'modules_to_save').test(key)) return 'excluded';
  const t = cfg.target_modules;
  if (t === null) return 'unmatched';
  if (typeof t === 'string') return fullMatch(t, key) ? 'match' : 'unmatched';
  if (t.includes(key)) return 'match';
  let found = t.some((s) => key.endsWith(`.${s}`));
  const ltt = cfg.layers_to_transform;
  const usingIndexes = ltt !== null && (Array.isArray(ltt) ? ltt.length > 0 : true);
  if (usingIndexes && found) {
    const lp = cfg.layers_pattern;
    let m: RegExpExecArray | null = null;
    if (lp === null || lp.length === 0) m = /^.*?\.[^.]*\.(\d+)\./.exec(key);
    else
      for (const p of typeof lp === 'string' ? [lp] : lp) {
        m = pyRegex(p, (x) => `^.*?\\.${x}\\.(\\d+)\\.`, 'layers_pattern').exec(key);
        if (m) break;
      }
    if (!m) found = false;
    else {
      const idx = Number(m[1]);
      found = typeof ltt === 'number' ? idx === ltt : (ltt as number[]).includes(idx);
    }
  }
  return found ? 'match' : 'unmatched';
}

/** get_pattern_key: the first rank_pattern/alpha_pattern key matching the end of the module name. */
export function getPatternKey(patternKeys: readonly string[], key: string): string {
  for (const p of patternKeys)
    if (pyRegex(p, (x) => `^(.*\\.)?(${x})$`, 'rank_pattern/alpha_pattern').test(key)) return p;
  return key;
}

/** r and alpha for one module, from rank_pattern/alpha_pattern or the defaults. */
export function rankAndAlpha(cfg: LoraConfig, key: string): { r: number; alpha: number } {
  const rk = getPatternKey(Object.keys(cfg.rank_pattern), key);
  const ak = getPatternKey(Object.keys(cfg.alpha_pattern), key);
  return { r: cfg.rank_pattern[rk] ?? cfg.r, alpha: cfg.alpha_pattern[ak] ?? cfg.lora_alpha };
}

/** modules_to_save matching as PEFT's _set_trainable: a plain suffix test (`key.endswith(name)`, no dot). */
export function matchesModulesToSave(names: readonly string[], key: string): boolean {
  return names.some((n) => key.endsWith(n));
}

/**
 * _find_minimal_target_modules: the smallest set of name suffixes that selects every target and no other module.
 */
export function findMinimalTargetModules(targets: Iterable<string>, others: Iterable<string>): string[] {
  const tset = new Set(targets);
  if (tset.size === 0 || tset.has('')) throw new ConfigError('target_modules should be a non-empty list of names');
  const oset = new Set(others);
  for (const t of tset) if (oset.has(t)) throw new ConfigError(`target module '${t}' is also listed as a non-target`);
  const suffixes = (s: string) => {
    const parts = s.split('.');
    return parts.map((_, i) => parts.slice(i).join('.')).reverse();
  };
  const otherSuffixes = new Set<string>();
  for (const o of oset) for (const s of suffixes(o)) otherSuffixes.add(s);
  const items = [...tset].map((t) => [t, suffixes(t)] as const);
  // Python sorts the (item, suffixes) pairs by the suffix lists: lexicographic over lists of strings
  items.sort((a, b) => cmpLists(a[1], b[1]));
  const required = new Set<string>();
  for (const [item, sfx] of items)
    for (const s of sfx) {
      if (required.has(s) || otherSuffixes.has(s)) continue;
      if (![...required].some((r) => item.endsWith(`.${r}`))) {
        required.add(s);
        break;
      }
    }
  return required.size ? [...required] : [...tset];
}

function cmpLists(a: readonly string[], b: readonly string[]): number {
  for (let i = 0; i < Math.min(a.length, b.length); i++) {
    if (a[i]! < b[i]!) return -1;
    if (a[i]! > b[i]!) return 1;
  }
  return a.length - b.length;
}

/**
 * Resolves target_modules for a model before matching: null gives the architecture's default list, 'all-linear'
 * (any case) every Linear except the output head; long lists are condensed to suffixes as PEFT does.
 * `modules` are the model's named modules (the root '' included); `isLinear` says which are linear layers and
 * `internal` which names are adapter internals (never targeted); `outputHead` is the output embedding's name.
 */
export function resolveTargetModules(
  cfg: LoraConfig,
  arch: Architecture,
  modules: readonly string[],
  isLinear: (name: string) => boolean,
  internal: (name: string) => boolean,
  outputHead: string | null,
): string | string[] {
  let t = cfg.target_modules;
  if (t === null) {
    const d = DEFAULT_TARGET_MODULES[arch];
    if (!d) throw new ConfigError('Please specify target_modules: there is no default for this architecture');
    t = [...d];
  }
  if (typeof t === 'string' && t.toLowerCase() === ALL_LINEAR) {
    t = modules.filter((n) => n !== '' && isLinear(n) && !internal(n) && n !== outputHead);
  }
  if (Array.isArray(t) && t.length >= MIN_TARGET_MODULES_FOR_OPTIMIZATION) {
    const set = new Set(t);
    const sfx = [...set].map((s) => `.${s}`);
    const others = modules.filter((n) => !set.has(n) && !sfx.some((s) => n.endsWith(s)));
    const minimal = findMinimalTargetModules(set, others);
    if (minimal.length < set.size) t = minimal;
  }
  return t;
}
