// GPT-2's byte-to-unicode table: byte-level BPE vocabularies store each byte as a printable character
// (printable ASCII and Latin-1 map to themselves, the other 68 bytes to U+0100..U+0143, so ' ' is 'Ġ').

function buildByteToChar(): string[] {
  const direct: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) direct.push(b);
  for (let b = 0xa1; b <= 0xac; b++) direct.push(b);
  for (let b = 0xae; b <= 0xff; b++) direct.push(b);
  const table = new Array<string>(256);
  for (const b of direct) table[b] = String.fromCharCode(b);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (table[b] === undefined) table[b] = String.fromCharCode(256 + n++);
  }
  return table;
}

/** BYTE_TO_CHAR[b] is the character byte b is written as in a byte-level BPE vocabulary. */
export const BYTE_TO_CHAR: readonly string[] = buildByteToChar();

/** Writes raw bytes the way a byte-level BPE vocabulary spells them. */
export function bytesToByteLevel(bytes: Uint8Array): string {
  let s = '';
  for (const b of bytes) s += BYTE_TO_CHAR[b];
  return s;
}

const encoder = new TextEncoder();

/** Spells text (as UTF-8) the way a byte-level BPE vocabulary does: "Hello world" -> "HelloĠworld". */
export function textToByteLevel(text: string): string {
  return bytesToByteLevel(encoder.encode(text));
}
