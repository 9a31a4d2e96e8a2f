// Typed errors. A user error says what is wrong, where (file, line, key, op and shapes) and how to fix it.
// The CLI prints `name: message` without a stack trace for LowrankError subclasses.

export class LowrankError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** A tensor's shape does not fit the op (names the op and the shapes involved). */
export class ShapeError extends LowrankError {}
/** A tensor's dtype does not fit the op. */
export class DTypeError extends LowrankError {}
/** An index is out of range (embedding ids, index-select, slices). */
export class IndexError extends LowrankError {}
/** A broken configuration: names the file and key. */
export class ConfigError extends LowrankError {}
/** A malformed file (checkpoint, adapter, GGUF, safetensors): names the file and the tensor or field. */
export class FormatError extends LowrankError {}
/** Bad training or evaluation data: names the file and line. */
export class DataError extends LowrankError {}
/** A tensor was used after dispose(), or another lifetime mistake. */
export class LifetimeError extends LowrankError {}
/** A request to a server or the API that cannot be served (bad parameters, unknown model). */
export class RequestError extends LowrankError {
  constructor(
    message: string,
    readonly status = 400,
    readonly code = 'invalid_request_error',
  ) {
    super(message);
  }
}

/** Formats a shape for messages: [2, 3, 4]. */
export function fmtShape(shape: readonly number[]): string {
  return `[${shape.join(', ')}]`;
}
