// Progress output: a one-line bar on a terminal (step, loss, learning rate, tokens/s, ETA), plain log lines
// otherwise.

export interface ProgressInfo {
  step: number;
  total: number;
  loss: number;
  lr: number;
  tokensPerSecond: number;
  etaSeconds: number;
  gradNorm?: number;
}

export function fmtDuration(s: number): string {
  if (!Number.isFinite(s)) return '?';
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = Math.floor(s % 60);
  return h > 0 ? `${h}h${String(m).padStart(2, '0')}m` : m > 0 ? `${m}m${String(sec).padStart(2, '0')}s` : `${sec}s`;
}

export function progressLine(p: ProgressInfo): string {
  return `step ${p.step}/${p.total} loss ${p.loss.toFixed(4)} lr ${p.lr.toExponential(2)}${p.gradNorm !== undefined ? ` grad_norm ${p.gradNorm.toFixed(3)}` : ''} ${Math.round(p.tokensPerSecond)} tok/s eta ${fmtDuration(p.etaSeconds)}`;
}

export class ProgressBar {
  private last = '';
  constructor(
    private readonly stream: NodeJS.WriteStream = process.stderr,
    readonly tty = !!process.stderr.isTTY,
  ) {}

  update(p: ProgressInfo): void {
    if (!this.tty) return;
    const width = 24;
    const done = Math.round((width * p.step) / Math.max(1, p.total));
    const bar = `[${'#'.repeat(done)}${'.'.repeat(width - done)}]`;
    this.last = `\r${bar} ${progressLine(p)}`;
    this.stream.write(`${this.last}\x1b[K`);
  }

  /** Prints a line above the bar (or plainly without a terminal). */
  log(line: string): void {
    if (this.tty && this.last) this.stream.write(`\r\x1b[K${line}\n${this.last}`);
    else this.stream.write(`${line}\n`);
  }

  end(): void {
    if (this.tty && this.last) this.stream.write('\n');
    this.last = '';
  }
}
