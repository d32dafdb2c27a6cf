// What a transport callback tells us, mapped to the core's TransactionResult.
//
// The mapping is strict about the shape it is given (a wrong status type is a host bug worth
// hearing about) and lenient about the remote's body (a remote's garbage is data, not a bug).

import { CallbackError, describe } from './errors.js';

const KINDS = new Set(['unreachable', 'timeout']);

// Errors from Node's net/tls/dns layers and undici that mean nothing reached the server.
const UNREACHABLE_CODES = new Set([
  'ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'EHOSTDOWN',
  'ERR_TLS_CERT_ALTNAME_INVALID', 'DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'CERT_HAS_EXPIRED', 'UND_ERR_CONNECT_TIMEOUT',
]);
const TIMEOUT_CODES = new Set(['ETIMEDOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', 'ABORT_ERR']);

const CALLBACK = 'transport.sendTransaction';

function parseBody(body) {
  if (body === undefined || body === null) return undefined;
  if (typeof body === 'string') {
    try {
      return JSON.parse(body);
    } catch {
      return undefined;
    }
  }
  if (body instanceof Uint8Array) return parseBody(new TextDecoder().decode(body));
  return body;
}

/**
 * Maps a transport answer to a TransactionResult:
 * - `{ status: 2xx, body }` → `ok`, with the per-PDU errors of `body.pdus`;
 * - `{ status, body, retryAfterMs? }` → `status` (retry-after on 429/503, from `retryAfterMs`
 *   or the body's `retry_after_ms`; `errcode` from the body);
 * - `{ error: 'unreachable' | 'timeout' }` → that outcome.
 * Throws CallbackError for anything else.
 */
export function toTransactionResult(response) {
  if (response === null || typeof response !== 'object') {
    throw new CallbackError(CALLBACK, `must resolve to {status, body, retryAfterMs} or {error}, got ${describe(response)}`);
  }
  if ('error' in response) {
    if (KINDS.has(response.error)) return { outcome: response.error };
    throw new CallbackError(CALLBACK, `error must be "unreachable" or "timeout", got ${describe(response.error)}`);
  }
  const { status } = response;
  if (!Number.isInteger(status) || status < 100 || status > 599) {
    throw new CallbackError(CALLBACK, `status must be an integer HTTP status (100-599), got ${describe(status)}`);
  }
  const body = parseBody(response.body);
  if (status >= 200 && status < 300) {
    const pduErrors = {};
    const pdus = body?.pdus;
    if (pdus && typeof pdus === 'object' && !Array.isArray(pdus)) {
      for (const [eventId, outcome] of Object.entries(pdus)) {
        if (outcome && typeof outcome === 'object' && 'error' in outcome) {
          pduErrors[eventId] = typeof outcome.error === 'string' ? outcome.error : describe(outcome.error);
        }
      }
    }
    return Object.keys(pduErrors).length ? { outcome: 'ok', pdu_errors: pduErrors } : { outcome: 'ok' };
  }
  const result = { outcome: 'status', status };
  if (status === 429 || status === 503) {
    let retryAfterMs = response.retryAfterMs;
    if (retryAfterMs !== undefined && retryAfterMs !== null) {
      if (!Number.isSafeInteger(retryAfterMs) || retryAfterMs < 0) {
        throw new CallbackError(CALLBACK, `retryAfterMs must be a whole number of ms, got ${describe(retryAfterMs)}`);
      }
    } else if (Number.isSafeInteger(body?.retry_after_ms) && body.retry_after_ms >= 0) {
      retryAfterMs = body.retry_after_ms;
    }
    if (retryAfterMs !== undefined && retryAfterMs !== null) result.retry_after_ms = retryAfterMs;
  }
  if (typeof body?.errcode === 'string') result.errcode = body.errcode;
  return result;
}

/**
 * Maps a thrown transport error to an outcome: `err.kind` ('unreachable'/'timeout') wins, then
 * Node/undici error codes. Anything unrecognised is a timeout: whether it reached the remote
 * is unknown, and retrying the same transaction id is safe because remotes deduplicate.
 * Returns `{ result, known }`; `known` is false when the error was not recognised.
 */
export function outcomeOfError(err) {
  if (KINDS.has(err?.kind)) return { result: { outcome: err.kind }, known: true };
  const code = err?.code ?? err?.cause?.code;
  if (UNREACHABLE_CODES.has(code)) return { result: { outcome: 'unreachable' }, known: true };
  if (TIMEOUT_CODES.has(code) || err?.name === 'TimeoutError') return { result: { outcome: 'timeout' }, known: true };
  return { result: { outcome: 'timeout' }, known: false };
}

/** An error a transport may throw to report a failure kind explicitly. */
export class TransportError extends Error {
  constructor(kind, message) {
    if (!KINDS.has(kind)) throw new TypeError(`TransportError kind must be "unreachable" or "timeout", got ${describe(kind)}`);
    super(message ?? kind);
    this.name = 'TransportError';
    this.kind = kind;
  }
}
