// HTTP errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}. The status codes matter:
// the OpenAI SDKs map them to exception classes and retry 408, 409, 429 and >= 500.

import { LowrankError, RequestError } from '../core/errors.ts';

const TYPE_OF_STATUS: Record<number, string> = {
  400: 'invalid_request_error',
  401: 'authentication_error',
  403: 'permission_error',
  404: 'invalid_request_error',
  405: 'invalid_request_error',
  413: 'invalid_request_error',
  415: 'invalid_request_error',
  429: 'rate_limit_error',
  503: 'server_error',
  504: 'timeout_error',
};

export class ApiError extends RequestError {
  readonly param: string | null;
  readonly type: string;
  /** Extra response headers (Retry-After, WWW-Authenticate, x-should-retry). */
  readonly headers: Record<string, string>;

  constructor(
    status: number,
    message: string,
    o: { param?: string | null; code?: string | null; type?: string; headers?: Record<string, string> } = {},
  ) {
    super(message, status, o.code ?? defaultCode(status));
    this.param = o.param ?? null;
    this.type = o.type ?? TYPE_OF_STATUS[status] ?? (status >= 500 ? 'server_error' : 'invalid_request_error');
    this.headers = o.headers ?? {};
  }
}

function defaultCode(status: number): string {
  switch (status) {
    case 401:
      return 'invalid_api_key';
    case 404:
      return 'not_found';
    case 413:
      return 'request_too_large';
    case 429:
      return 'rate_limit_exceeded';
    case 503:
      return 'unavailable';
    case 504:
      return 'timeout';
    default:
      return status >= 500 ? 'internal_error' : 'invalid_request_error';
  }
}

/** The 404 for a model name that does not exist or that this key may not use (the same answer for both). */
export function modelNotFound(name: string): ApiError {
  return new ApiError(404, `The model \`${name}\` does not exist.`, { param: 'model', code: 'model_not_found' });
}

/** Any thrown value as an ApiError; internal errors lose their details (logged, never sent). */
export function toApiError(e: unknown): ApiError {
  if (e instanceof ApiError) return e;
  if (e instanceof RequestError) return new ApiError(e.status, e.message, { code: e.code });
  if (e instanceof LowrankError) return new ApiError(400, `${e.name}: ${e.message}`);
  console.error('serve: internal error:', e);
  return new ApiError(500, 'internal server error');
}

export interface ErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

export function errorBody(e: ApiError): ErrorBody {
  return { error: { message: e.message, type: e.type, param: e.param, code: e.code } };
}
