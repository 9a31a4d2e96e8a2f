// Dataset readers: JSONL, JSON and CSV/TSV files into records that remember their line.
//
// Every record keeps the 1-based line where it starts, so a later error (a missing field, a wrong type)
// names `file:line`. JSON is parsed with JSON.parse and then scanned once more to find where each record
// starts; CSV/TSV is RFC 4180 (quoted fields, "" escapes, newlines inside quotes, CRLF or LF).

import { readFileSync } from 'node:fs';
import path from 'node:path';
import { DataError } from '../core/errors.ts';

/** One record of a data file and the line it starts on. */
export interface SourceRecord {
  value: Record<string, unknown>;
  line: number;
}

export type ReaderKind = 'jsonl' | 'json' | 'csv' | 'tsv';

export interface ReadOptions {
  /** Forces the reader; otherwise chosen from the extension (.jsonl/.ndjson, .json, .csv, .tsv). */
  kind?: ReaderKind | null;
  /** For a JSON object of splits ({"train": [...], "test": [...]}): which one. Default 'train'. */
  split?: string;
}

/** Reads a data file into records. Throws DataError (with file:line) for unreadable, empty or malformed files. */
export function readRecords(file: string, opts: ReadOptions = {}): SourceRecord[] {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'no such file' : code === 'EISDIR' ? 'a directory, not a file' : String(code ?? e);
    throw new DataError(
      `cannot read dataset ${file}: ${why}; check the path in datasets (relative paths start at the config's folder)`,
    );
  }
  const kind = opts.kind ?? kindFromExtension(file);
  return parseRecords(text, file, kind, opts.split ?? 'train', opts.kind == null);
}

export function kindFromExtension(file: string): ReaderKind {
  const ext = path.extname(file).toLowerCase();
  if (ext === '.jsonl' || ext === '.ndjson') return 'jsonl';
  if (ext === '.json') return 'json';
  if (ext === '.csv') return 'csv';
  if (ext === '.tsv') return 'tsv';
  throw new DataError(
    `${file}: cannot tell the format from the extension '${ext}'; use .jsonl, .json, .csv or .tsv, or set ds_type in the dataset entry`,
  );
}

/** Parses file text (exported for tests and for data that does not come from a file). */
export function parseRecords(
  text: string,
  file: string,
  kind: ReaderKind,
  split = 'train',
  guess = false,
): SourceRecord[] {
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  if (text.trim() === '') throw new DataError(`${file} is empty: no records; a dataset needs at least one example`);
  let records: SourceRecord[];
  if (kind === 'jsonl') records = parseJsonl(text, file);
  else if (kind === 'json') records = parseJson(text, file, split, guess);
  else records = parseCsv(text, file, kind === 'tsv' ? '\t' : ',');
  if (records.length === 0) throw new DataError(`${file} is empty: no records; a dataset needs at least one example`);
  return records;
}

// ---------------------------------------------------------------------------------------------------------
// JSONL
// ---------------------------------------------------------------------------------------------------------

export function parseJsonl(text: string, file: string): SourceRecord[] {
  const out: SourceRecord[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.replace(/\r$/, '');
    if (line.trim() === '') continue;
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch (e) {
      throw new DataError(
        `${file}:${i + 1}: invalid JSON (${(e as Error).message}); each line of a .jsonl file must be one JSON object`,
      );
    }
    out.push({
      value: asRecord(value, file, i + 1, 'each line of a .jsonl file must be one JSON object'),
      line: i + 1,
    });
  }
  return out;
}

function asRecord(value: unknown, file: string, line: number, rule: string): Record<string, unknown> {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    const found = value === null ? 'null' : Array.isArray(value) ? 'a list' : `a ${typeof value}`;
    throw new DataError(`${file}:${line}: expected a JSON object, found ${found}; ${rule}`);
  }
  return value as Record<string, unknown>;
}

// ---------------------------------------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------------------------------------

function parseJson(text: string, file: string, split: string, guess: boolean): SourceRecord[] {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (e) {
    // Many ".json" datasets are really JSON Lines (Hugging Face datasets reads both): try that first.
    if (guess) {
      const first = text.split('\n').find((l) => l.trim() !== '') ?? '';
      try {
        const v = JSON.parse(first);
        if (v !== null && typeof v === 'object' && !Array.isArray(v)) return parseJsonl(text, file);
      } catch {
        // not JSONL either: report the JSON error below
      }
    }
    const msg = (e as Error).message;
    const m = /position (\d+)/.exec(msg);
    const where = m ? `${file}:${lineColAt(text, Number(m[1]))}` : file;
    throw new DataError(`${where}: invalid JSON (${msg}); fix the file or convert it to JSON Lines`);
  }
  const shape = 'expected an array of records, {"data": [...]}, or an object of splits such as {"train": [...]}';
  let arrayKey: string | null = null;
  let items: unknown[];
  if (Array.isArray(data)) {
    items = data;
  } else if (data !== null && typeof data === 'object') {
    const obj = data as Record<string, unknown>;
    if (Array.isArray(obj.data)) arrayKey = 'data';
    else if (Array.isArray(obj[split])) arrayKey = split;
    else {
      const keys = Object.keys(obj).slice(0, 8).join(', ');
      throw new DataError(`${file}:1: ${shape}; found an object with keys ${keys || '(none)'} (split '${split}')`);
    }
    items = obj[arrayKey] as unknown[];
  } else {
    throw new DataError(`${file}:1: ${shape}; found a ${data === null ? 'null' : typeof data}`);
  }
  const starts = elementOffsets(text, arrayKey);
  const lines = lineIndex(text);
  return items.map((v, i) => {
    const line = starts[i] === undefined ? 1 : lineAt(lines, starts[i]!);
    return { value: asRecord(v, file, line, 'a JSON dataset holds one object per record'), line };
  });
}

/** Offsets where the elements of the records array start (the top-level array, or obj[key]). */
function elementOffsets(s: string, key: string | null): number[] {
  let i = skipWs(s, 0);
  if (key === null) return arrayStarts(s, i);
  // Walk the top-level object's members until `key`.
  i = skipWs(s, i + 1);
  while (i < s.length && s[i] !== '}') {
    const end = skipString(s, i);
    const name = JSON.parse(s.slice(i, end)) as string;
    i = skipWs(s, end);
    i = skipWs(s, i + 1); // ':'
    if (name === key && s[i] === '[') return arrayStarts(s, i);
    i = skipWs(s, skipValue(s, i));
    if (s[i] === ',') i = skipWs(s, i + 1);
  }
  return [];
}

function arrayStarts(s: string, i: number): number[] {
  const starts: number[] = [];
  i = skipWs(s, i + 1);
  while (i < s.length && s[i] !== ']') {
    starts.push(i);
    i = skipWs(s, skipValue(s, i));
    if (s[i] === ',') i = skipWs(s, i + 1);
  }
  return starts;
}

function isWs(c: string | undefined): boolean {
  return c === ' ' || c === '\n' || c === '\r' || c === '\t';
}

function skipWs(s: string, i: number): number {
  while (i < s.length && isWs(s[i])) i++;
  return i;
}

function skipString(s: string, i: number): number {
  i++;
  while (i < s.length) {
    const c = s[i];
    if (c === '\\') i += 2;
    else if (c === '"') return i + 1;
    else i++;
  }
  return i;
}

/** Skips one JSON value (the text is known to be valid JSON). */
function skipValue(s: string, i: number): number {
  const c = s[i];
  if (c === '"') return skipString(s, i);
  if (c === '{' || c === '[') {
    let depth = 0;
    while (i < s.length) {
      const ch = s[i];
      if (ch === '"') {
        i = skipString(s, i);
        continue;
      }
      if (ch === '{' || ch === '[') depth++;
      else if (ch === '}' || ch === ']') {
        depth--;
        if (depth === 0) return i + 1;
      }
      i++;
    }
    return i;
  }
  while (i < s.length && !isWs(s[i]) && s[i] !== ',' && s[i] !== ']' && s[i] !== '}') i++;
  return i;
}

/** Offsets of line starts, for offset -> line. */
function lineIndex(text: string): number[] {
  const starts = [0];
  for (let i = 0; i < text.length; i++) if (text.charCodeAt(i) === 10) starts.push(i + 1);
  return starts;
}

function lineAt(starts: number[], offset: number): number {
  let lo = 0;
  let hi = starts.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (starts[mid]! <= offset) lo = mid;
    else hi = mid - 1;
  }
  return lo + 1;
}

function lineColAt(text: string, offset: number): string {
  const starts = lineIndex(text);
  const line = lineAt(starts, offset);
  return `${line}:${offset - starts[line - 1]! + 1}`;
}

// ---------------------------------------------------------------------------------------------------------
// CSV / TSV (RFC 4180)
// ---------------------------------------------------------------------------------------------------------

interface CsvRow {
  fields: string[];
  line: number;
}

/** Splits CSV text into rows of fields; each row remembers the line it starts on. */
export function parseCsvRows(text: string, file: string, delimiter = ','): CsvRow[] {
  const rows: CsvRow[] = [];
  let fields: string[] = [];
  let field = '';
  let line = 1;
  let rowLine = 1;
  let i = 0;
  let fieldStarted = false; // distinguishes an empty line from a row with one empty field
  const endRow = () => {
    if (fieldStarted || fields.length > 0) rows.push({ fields: [...fields, field], line: rowLine });
    fields = [];
    field = '';
    fieldStarted = false;
  };
  while (i < text.length) {
    const c = text[i]!;
    if (c === '"' && field === '') {
      // A quoted field: runs to the closing quote; "" is a literal quote; newlines are kept.
      const quoteLine = line;
      i++;
      let closed = false;
      while (i < text.length) {
        const q = text[i]!;
        if (q === '"') {
          if (text[i + 1] === '"') {
            field += '"';
            i += 2;
            continue;
          }
          closed = true;
          i++;
          break;
        }
        if (q === '\n') line++;
        field += q;
        i++;
      }
      if (!closed) {
        throw new DataError(`${file}:${quoteLine}: unterminated quoted field (a '"' opens it but none closes it)`);
      }
      fieldStarted = true;
      const next = text[i];
      if (next !== undefined && next !== delimiter && next !== '\n' && next !== '\r') {
        throw new DataError(
          `${file}:${line}: unexpected character after a closing quote; inside a quoted field write a quote as ""`,
        );
      }
      continue;
    }
    if (c === delimiter) {
      fields.push(field);
      field = '';
      fieldStarted = true;
      i++;
      continue;
    }
    if (c === '\n' || c === '\r') {
      if (c === '\r' && text[i + 1] === '\n') i++;
      i++;
      endRow();
      line++;
      rowLine = line;
      continue;
    }
    field += c;
    fieldStarted = true;
    i++;
  }
  endRow();
  return rows;
}

export function parseCsv(text: string, file: string, delimiter = ','): SourceRecord[] {
  const rows = parseCsvRows(text, file, delimiter);
  if (rows.length === 0) throw new DataError(`${file} is empty: no records; a dataset needs at least one example`);
  const header = rows[0]!.fields.map((h) => h.trim());
  const seen = new Set<string>();
  for (const h of header) {
    if (h === '') throw new DataError(`${file}:${rows[0]!.line}: empty column name in the header row`);
    if (seen.has(h)) throw new DataError(`${file}:${rows[0]!.line}: column '${h}' appears twice in the header row`);
    seen.add(h);
  }
  if (rows.length === 1) throw new DataError(`${file} has a header row but no records`);
  return rows.slice(1).map((row) => {
    if (row.fields.length !== header.length) {
      throw new DataError(
        `${file}:${row.line}: ${row.fields.length} field(s) but the header has ${header.length}; quote fields that contain '${delimiter === '\t' ? '\\t' : delimiter}' or line breaks`,
      );
    }
    const value: Record<string, unknown> = {};
    header.forEach((h, j) => {
      value[h] = row.fields[j];
    });
    return { value, line: row.line };
  });
}
