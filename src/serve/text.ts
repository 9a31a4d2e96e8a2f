// Generated tokens to streamed text, with stop strings: text that might be the start of a stop string is
// held back until it is known not to be, and a stop string ends the text before it (it is not part of the
// output, as in OpenAI's API). Same rules as models/generate.ts, incremental instead of re-decoding.
// The decoder is seeded with the prompt's last tokens, so the text is what the generated tokens add to the
// prompt's text: prompt + completion reads right (SentencePiece decoders drop the leading space of a first
// token, so decoding the generated ids alone would turn "Once" + " upon" into "Onceupon").

import type { StreamDecoder, Tokenizer } from '../tokenize/tokenizer.ts';

/** Prompt tokens given to the decoder as context. */
const PROMPT_CONTEXT = 4;

export class TextStream {
  private readonly decoder: StreamDecoder;
  /** Decoded text of the generated tokens so far (before stop-string truncation). */
  private full = '';
  /** Characters of `full` already given out. */
  private emitted = 0;
  private readonly maxStop: number;
  /** Set once a stop string has been seen: the final text. */
  stopped = false;

  constructor(
    tokenizer: Tokenizer,
    private readonly stops: readonly string[],
    prompt: readonly number[] = [],
  ) {
    this.decoder = tokenizer.streamDecoder({ skipSpecialTokens: true });
    this.maxStop = Math.max(0, ...stops.map((s) => s.length));
    const tail = prompt.slice(-PROMPT_CONTEXT);
    // a tail that ends inside a character would leak into the text: then decode without context
    if (tail.length > 0 && !tokenizer.decode(tail, { skipSpecialTokens: true }).endsWith('\uFFFD')) {
      this.decoder.push(tail);
      this.decoder.flush();
    }
  }

  /** Text given out so far. */
  get text(): string {
    return this.full.slice(0, this.emitted);
  }

  /**
   * Adds a generated token; returns the text that can be given out now. `last` releases everything
   * (an incomplete character and a possible stop prefix included). After a stop string is found,
   * `stopped` is true and the caller ends the sequence.
   */
  push(token: number, last: boolean): string {
    this.full += this.decoder.push(token);
    if (last) this.full += this.decoder.flush();
    return this.release(last);
  }

  /** Releases held-back text when generation ends for another reason (EOS, a stop token id). */
  finish(): string {
    this.full += this.decoder.flush();
    return this.release(true);
  }

  private release(all: boolean): string {
    if (this.stops.length > 0) {
      // a stop string can only start in the part not yet given out (or straddle its start)
      const from = Math.max(0, this.emitted - this.maxStop + 1);
      let cut = -1;
      for (const s of this.stops) {
        if (!s) continue;
        const i = this.full.indexOf(s, from);
        if (i >= 0 && (cut < 0 || i < cut)) cut = i;
      }
      if (cut >= 0) {
        this.stopped = true;
        this.full = this.full.slice(0, Math.max(cut, this.emitted));
        return this.take(this.full.length);
      }
    }
    if (all) return this.take(this.full.length);
    let hold = 0;
    for (const s of this.stops)
      for (let k = Math.min(s.length - 1, this.full.length - this.emitted); k > 0; k--)
        if (this.full.endsWith(s.slice(0, k))) {
          hold = Math.max(hold, k);
          break;
        }
    return this.take(this.full.length - hold);
  }

  private take(upTo: number): string {
    if (upTo <= this.emitted) return '';
    const out = this.full.slice(this.emitted, upTo);
    this.emitted = upTo;
    return out;
  }
}
