// @ts-check
/**
 * sandgate's JavaScript client: the REST API plus one WebSocket session per sandbox
 * (docs/protocol.md is the contract; docs/clients.md documents this module).
 *
 * - Runs in browsers and in Node (22+, or 20 with `--experimental-websocket`); no dependencies.
 * - Authenticates the WebSocket with the `sandgate.bearer.<base64url key>` subprotocol, so the key
 *   never appears in a URL; REST calls send `Authorization: Bearer`.
 * - Reconnects by itself and resumes every stream from its last sequence number (`exec.attach` with
 *   `from_seq`): events are delivered once, in order; a range the gateway could no longer replay is
 *   reported as a `lost` event, never skipped silently.
 * - Nothing hangs: every request has a deadline, a quiet connection is pinged, a stream that stops
 *   getting events (the gateway sends keepalives) or a ping left unanswered drops the connection and
 *   reconnects, and a reconnect that cannot succeed (sandbox gone, key revoked, gateway away for
 *   `reconnectFor` ms) ends every stream with an error.
 *
 * @module @sandgate/client
 */

// Every protocol constant comes from the gateway's op schema (generated; a test checks it).
import { PROTOCOL } from "./protocol.js";

export { PROTOCOL };
export const [JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL] = PROTOCOL.subprotocols;
const BEARER_PREFIX = PROTOCOL.bearer_prefix;
/** The gateway takes at most this much per `fs.write` (docs/protocol.md §3). */
export const MAX_WRITE_CHUNK = PROTOCOL.ops["fs.write"].fields.data.max;
/** Close codes after which reconnecting cannot help (docs/protocol.md §5). */
const CLOSE_DESTROYED = PROTOCOL.close_codes.destroyed;
const CLOSE_PROTOCOL_ERROR = PROTOCOL.close_codes.protocol_error;
/** Ops that may be sent again unchanged when the connection drops with them in flight. */
const IDEMPOTENT_OPS = new Set(Object.entries(PROTOCOL.ops).filter(([, op]) => op.idempotent).map(([name]) => name));

// ------------------------------------------------------------------------------------------------
// Types
// ------------------------------------------------------------------------------------------------

/**
 * @typedef {object} GatewayOptions
 * @property {string} apiKey  the API key (sent as a bearer subprotocol / Authorization header, never in a URL)
 * @property {string} [url]  the gateway's base URL; default: the page's origin
 * @property {"json" | "msgpack"} [wire]  WebSocket subprotocol; default "json"
 * @property {{encode(value: unknown): Uint8Array, decode(data: Uint8Array): unknown}} [msgpack]
 *   the `@msgpack/msgpack` module (or anything with its `encode`/`decode`); imported by name when
 *   `wire` is "msgpack" and this is not given (works in Node; browsers need an import map)
 * @property {typeof WebSocket} [WebSocket]  default `globalThis.WebSocket`
 * @property {typeof fetch} [fetch]  default `globalThis.fetch`
 * @property {number} [requestTimeout]  ms a request may wait for its reply (default 60000)
 * @property {number} [connectTimeout]  ms opening a WebSocket and its `hello` may take (default 10000)
 * @property {number} [pingInterval]  ms of silence after which the connection is pinged (default 15000)
 * @property {number} [pingTimeout]  ms a ping may take before the connection is taken as dead (default 10000)
 * @property {number} [streamIdleTimeout]  ms a running stream may go without any event, keepalives
 *   included, before the connection is taken as dead (default 60000; the gateway's keepalive is 15 s)
 * @property {number} [reconnectFor]  ms to keep trying to reconnect before giving up (default 120000)
 * @property {number} [callTimeout]  ms a call that runs code (invoke, runTests, execute, invokeFunction)
 *   may take when its body has no `timeout`; with one, that plus `requestTimeout` (default 600000)
 */

/**
 * What `exec.start` takes (docs/protocol.md §3), in camelCase; give `code` (+ `language`) or `command`.
 * @typedef {object} ExecRequest
 * @property {string} [code]
 * @property {string} [codeRef]  instead of `code`: the sha256 of code the gateway cached (its language by default)
 * @property {string} [language]  "python" (default with `code`) or "javascript"
 * @property {string[] | string} [command]  argv, or a shell string
 * @property {string} [tag]  a label `attach` can select by
 * @property {string} [execId]  default: a fresh random id (so a dropped `exec.start` can be resumed)
 * @property {string} [namespace]  python: "default", "fresh" or a name
 * @property {string | Uint8Array} [stdin]  written to stdin at start
 * @property {boolean} [stdinOpen]  keep stdin open for `Exec.write` (default: true with `pty`)
 * @property {Record<string, string>} [env]
 * @property {string} [cwd]
 * @property {number} [timeout]  seconds
 * @property {{rows: number, cols: number}} [pty]  run on a pseudo-terminal (capability `exec.pty`)
 */

/**
 * @typedef {object} ExecResult
 * @property {string} execId
 * @property {number | null} exitCode
 * @property {string | null} signal
 * @property {number | null} durationMs
 * @property {boolean} truncated
 * @property {{code: string, message: string, retryable: boolean} | undefined} error
 *   set when the exec started and then failed (timeout, guest_died, or the session gave up)
 */

/**
 * @typedef {object} ExecHandlers
 * @property {(info: {execId: string, pid: number | null}) => void} [onStart]
 * @property {(data: Uint8Array, fd: "stdout" | "stderr" | "pty") => void} [onData]
 * @property {(bundle: DisplayBundle) => void} [onDisplay]  rich output of Python code, in order with onData
 * @property {(result: ExecResult) => void} [onEnd]
 * @property {(range: [number, number]) => void} [onLost]  sequence numbers the gateway could not replay
 */

/**
 * Rich output of a Python exec (a `display` event; REST results list them as `display`): MIME type
 * -> content, every value a string: `image/png` and `image/jpeg` base64, `application/json` JSON
 * text, `text/plain` always there. `text/html` and `image/svg+xml` come from the sandbox's code:
 * untrusted, never to be put into a page's DOM (the IDE shows html in a sandboxed iframe).
 * @typedef {Record<string, string>} DisplayBundle
 */

/** @typedef {"connecting" | "open" | "reconnecting" | "closed"} SessionState */

/**
 * A function call (REST `POST .../invoke`, the `invoke` op): give `code` or `code_ref`.
 * @typedef {object} InvokeRequest
 * @property {string} function  the function's name
 * @property {any[]} [args]  positional arguments (JSON values)
 * @property {Record<string, any>} [kwargs]  keyword arguments; JavaScript gets them as a last options object
 * @property {string} [code]
 * @property {string} [code_ref]  the sha256 of code the gateway cached for this tenant (`cacheEntries`)
 * @property {string} [language]  "python" (default) or "javascript"
 * @property {number} [timeout]  seconds
 * @property {Record<string, string | Uint8Array>} [files]  written before the call (bytes sent as base64)
 */

/**
 * @typedef {object} InvokeResult
 * @property {"success" | "error" | "crash" | "timeout" | "terminated"} status
 * @property {any} result  the return value (JSON), null unless `status` is success
 * @property {{type: string, message: string, traceback: string} | null} error  `type`: the exception's class
 * @property {string} stdout
 * @property {string} stderr
 * @property {DisplayBundle[]} display  rich output (Python)
 * @property {number | null} duration_ms
 * @property {{created: string[], modified: string[], deleted: string[]}} files
 * @property {string} exec_id
 */

/**
 * @typedef {object} TestRequest
 * @property {string} tests  pytest tests (Python) or `test(name, fn)` calls (JavaScript)
 * @property {string} [code]
 * @property {string} [code_ref]
 * @property {string} [language]
 * @property {number} [timeout]  seconds
 */

/**
 * @typedef {object} TestReport
 * @property {boolean} success
 * @property {{total: number, passed: number, failed: number, skipped: number}} summary
 * @property {{name: string, passed: boolean, skipped: boolean, duration_ms: number | null, error: string | null}[]} tests
 * @property {{type: string, message: string} | null} error  why the run itself did not finish
 * @property {string} stdout
 * @property {string} stderr
 */

/**
 * An async execution (REST `GET .../executions/{id}`).
 * @typedef {object} Execution
 * @property {string} id
 * @property {"pending" | "running" | "completed" | "failed" | "cancelled" | "timeout"} state
 * @property {string | null} tag
 * @property {number | null} exit_code
 * @property {string} stdout  from `output_offset` on
 * @property {string} stderr
 * @property {DisplayBundle[]} display  rich output (Python) from `output_offset` on
 * @property {number} output_offset  where the next poll continues
 */

// ------------------------------------------------------------------------------------------------
// Errors and helpers
// ------------------------------------------------------------------------------------------------

/**
 * An error with the protocol's stable `code` (docs/protocol.md §4). Client-side codes: `disconnected`
 * (the connection dropped while the request was in flight: whether it ran is unknown; retryable),
 * `closed` (the session was closed by `Sandbox.close`), and `timeout` (a request's deadline passed).
 */
export class SandgateError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {boolean} [retryable]
   * @param {number} [status]  the HTTP status, for REST errors
   * @param {number} [retryAfter]  seconds to wait before retrying, where the gateway said (429s:
   *   quotas, a deployed function whose instances are busy and whose queue is full)
   */
  constructor(code, message, retryable = false, status = undefined, retryAfter = undefined) {
    super(`${code}: ${message}`);
    this.name = "SandgateError";
    this.code = code;
    this.detail = message;
    this.retryable = retryable;
    this.status = status;
    this.retryAfter = retryAfter;
  }

  /**
   * @param {any} wire  `{code, message, retryable}` @param {number} [status]
   * @param {number} [retryAfter]
   */
  static fromWire(wire, status, retryAfter) {
    return new SandgateError(String(wire?.code ?? "internal"), String(wire?.message ?? "no message"),
      Boolean(wire?.retryable), status, retryAfter);
  }

  /** The wire form, as stream `end` events carry it. */
  toWire() {
    return { code: this.code, message: this.detail, retryable: this.retryable };
  }
}

/** @param {Uint8Array} bytes */
function toBase64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

/** @param {string} text */
function fromBase64(text) {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

const encoder = new TextEncoder();

/** @param {string | Uint8Array | ArrayBuffer} data */
function asBytes(data) {
  if (typeof data === "string") return encoder.encode(data);
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (data instanceof Uint8Array) return data;
  throw new TypeError("data must be a string, Uint8Array or ArrayBuffer");
}

/**
 * The subprotocol entry that carries an API key (docs/protocol.md §5).
 * @param {string} key
 */
export function bearerSubprotocol(key) {
  return BEARER_PREFIX + toBase64(encoder.encode(key)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** Drop undefined fields: msgpack would send them as nil, which the gateway reads as mistyped. */
function clean(/** @type {Record<string, any>} */ message) {
  /** @type {Record<string, any>} */
  const out = {};
  for (const [key, value] of Object.entries(message)) if (value !== undefined) out[key] = value;
  return out;
}

function randomId() {
  const bytes = new Uint8Array(9);
  globalThis.crypto.getRandomValues(bytes);
  return "js-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** @param {() => void} fn @param {number} ms */
function timer(fn, ms) {
  const handle = setTimeout(fn, ms);
  // In Node, a pending deadline must not keep a finished script alive.
  /** @type {any} */ (handle).unref?.();
  return handle;
}

/** A tiny event emitter: `on(type, fn)` returns the function that removes `fn`. */
class Emitter {
  /** @type {Map<string, Set<Function>>} */
  #handlers = new Map();

  /**
   * @param {string} type
   * @param {Function} fn
   * @returns {() => void} removes the handler
   */
  on(type, fn) {
    let set = this.#handlers.get(type);
    if (!set) this.#handlers.set(type, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  /** @param {string} type @param {...any} args */
  emit(type, ...args) {
    for (const fn of this.#handlers.get(type) ?? []) {
      try {
        fn(...args);
      } catch (err) {
        // A broken handler must not break the session's message loop.
        console.error(`sandgate: a '${type}' handler threw`, err);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Codecs
// ------------------------------------------------------------------------------------------------

/** Fields that carry bytes: base64 strings in JSON, `bin` in msgpack. */
const BINARY_FIELDS = PROTOCOL.binary_fields;

const jsonCodec = {
  subprotocol: JSON_SUBPROTOCOL,
  /** @param {Record<string, any>} message */
  encode(message) {
    const out = clean(message);
    for (const name of BINARY_FIELDS) if (out[name] instanceof Uint8Array) out[name] = toBase64(out[name]);
    return JSON.stringify(out);
  },
  /** @param {any} payload */
  decode(payload) {
    if (typeof payload !== "string") throw new SandgateError("bad_frame", "a JSON session got a binary frame");
    const message = JSON.parse(payload);
    if (typeof message?.data === "string") message.data = fromBase64(message.data);
    return message;
  },
};

/** @param {{encode(value: unknown): Uint8Array, decode(data: Uint8Array): unknown}} msgpack */
function msgpackCodec(msgpack) {
  return {
    subprotocol: MSGPACK_SUBPROTOCOL,
    /** @param {Record<string, any>} message */
    encode(message) {
      return msgpack.encode(clean(message));
    },
    /** @param {any} payload */
    decode(payload) {
      if (typeof payload === "string") throw new SandgateError("bad_frame", "a msgpack session got a text frame");
      return /** @type {any} */ (msgpack.decode(new Uint8Array(payload)));
    },
  };
}

// ------------------------------------------------------------------------------------------------
// Gateway: REST
// ------------------------------------------------------------------------------------------------

/** A gateway and an API key: REST calls, and `connect`/`createSandbox` for sessions. */
export class Gateway {
  /** @param {GatewayOptions} options */
  constructor(options) {
    if (!options || typeof options.apiKey !== "string" || !options.apiKey) {
      throw new TypeError("Gateway needs {apiKey: '<API key>'}");
    }
    const base = options.url ?? globalThis.location?.origin;
    if (!base) throw new TypeError("Gateway needs {url} outside a browser page");
    this.url = new URL(base).origin;
    this.options = {
      wire: "json", requestTimeout: 60000, connectTimeout: 10000, pingInterval: 15000, pingTimeout: 10000,
      streamIdleTimeout: 60000, reconnectFor: 120000, callTimeout: 600000, ...options,
    };
    if (this.options.wire !== "json" && this.options.wire !== "msgpack") {
      throw new TypeError(`wire must be "json" or "msgpack", not ${JSON.stringify(this.options.wire)}`);
    }
    this.#fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /** @type {typeof fetch} */
  #fetch;

  /**
   * One REST call; the parsed JSON answer (null for an empty one).
   * @param {string} method
   * @param {string} path  starting with /v1/
   * @param {unknown} [body]  JSON-encoded unless it is a Blob, ArrayBuffer, Uint8Array or string
   * @param {{timeout?: number}} [options]  `timeout`: ms the call may take (default `requestTimeout`)
   * @returns {Promise<any>}
   * @throws {SandgateError} with the gateway's error code and the HTTP status (and `retryAfter`
   *   when the gateway said when to retry)
   */
  async rest(method, path, body = undefined, options = {}) {
    const response = await this.#call(method, path, body, options.timeout);
    const text = await response.text();
    return text ? JSON.parse(text) : null;
  }

  /**
   * @param {string} method @param {string} path @param {unknown} body @param {number} [timeout]
   * @returns {Promise<Response>}
   */
  async #call(method, path, body, timeout = undefined) {
    /** @type {Record<string, string>} */
    const headers = { Authorization: `Bearer ${this.options.apiKey}` };
    /** @type {any} */
    let payload = body;
    if (body !== undefined && !(body instanceof Uint8Array || body instanceof ArrayBuffer
        || typeof body === "string" || (typeof Blob !== "undefined" && body instanceof Blob))) {
      payload = JSON.stringify(body);
      headers["Content-Type"] = "application/json";
    }
    const controller = new AbortController();
    const deadline = timer(() => controller.abort(), timeout ?? this.options.requestTimeout);
    let response;
    try {
      response = await this.#fetch(this.url + path, { method, headers, body: payload, signal: controller.signal });
    } catch (err) {
      const timedOut = controller.signal.aborted;
      throw new SandgateError(timedOut ? "timeout" : "disconnected",
        `${method} ${path}: ${timedOut ? "no answer in time" : String(err)}`, true);
    } finally {
      clearTimeout(deadline);
    }
    if (!response.ok) {
      let wire = { code: "internal", message: `HTTP ${response.status}`, retryable: response.status >= 500 };
      try {
        wire = (await response.json()).error ?? wire;
      } catch {
        // not a sandgate error body (a proxy's page): keep the HTTP status as the message
      }
      const retryAfter = Number(response.headers.get("Retry-After") ?? NaN);
      throw SandgateError.fromWire(wire, response.status, Number.isFinite(retryAfter) ? retryAfter : undefined);
    }
    return response;
  }

  /** @returns {Promise<{runtimes: {id: string, description: string, capabilities: string[]}[], unavailable: Record<string, string>}>} */
  runtimes() {
    return this.rest("GET", "/v1/runtimes");
  }

  /** This tenant's sandboxes. @returns {Promise<any[]>} */
  async listSandboxes() {
    return (await this.rest("GET", "/v1/sandboxes")).sandboxes;
  }

  /** @param {string} id @returns {Promise<any>} the sandbox's description */
  getSandbox(id) {
    return this.rest("GET", `/v1/sandboxes/${encodeURIComponent(id)}`);
  }

  /** @param {string} id */
  async destroySandbox(id) {
    await this.rest("DELETE", `/v1/sandboxes/${encodeURIComponent(id)}`);
  }

  /**
   * Change a running sandbox's network policy; open connections it refuses are ended.
   * @param {string} id
   * @param {string|{allow?: string[], deny?: string[]}} policy "none", "public", "all" or rules
   * @returns {Promise<any>} the sandbox's description
   */
  setNetwork(id, policy) {
    return this.rest("PATCH", `/v1/sandboxes/${encodeURIComponent(id)}`, { network: policy });
  }

  /**
   * A sandbox's policy, secrets (names and hosts, never values), network figures and recent refusals.
   * @param {string} id
   * @returns {Promise<any>}
   */
  network(id) {
    return this.rest("GET", `/v1/sandboxes/${encodeURIComponent(id)}/network`);
  }

  /**
   * Create a sandbox and open a session on it.
   * @param {{runtime?: string, ttl?: number, idle_timeout?: number, memory_mb?: number,
   *          cpu_seconds?: number, disk_mb?: number, metadata?: Record<string, string>,
   *          network?: string|{allow?: string[], deny?: string[]},
   *          secrets?: {env: string, value: string, hosts: string[]}[]}} [spec]
   * @returns {Promise<Sandbox>}
   */
  async createSandbox(spec = {}) {
    const info = await this.rest("POST", "/v1/sandboxes", spec);
    return this.connect(info.id);
  }

  /**
   * Open a session on an existing sandbox; resolves once the session said `hello`.
   * @param {string} id
   * @returns {Promise<Sandbox>}
   */
  async connect(id) {
    const codec = this.options.wire === "json" ? jsonCodec : msgpackCodec(await this.#msgpack());
    const sandbox = new Sandbox(this, id, codec);
    await sandbox.ready;
    return sandbox;
  }

  async #msgpack() {
    if (this.options.msgpack) return this.options.msgpack;
    const name = "@msgpack/msgpack"; // a variable, so bundlers leave the optional import alone
    try {
      return await import(name);
    } catch (err) {
      throw new TypeError(`wire "msgpack" needs @msgpack/msgpack: pass {msgpack} or install it (${err})`);
    }
  }

  /**
   * Upload a file over REST (streamed; any size the disk quota allows).
   * @param {string} id  the sandbox
   * @param {string} path  relative to the sandbox's working folder (/work), or absolute
   * @param {Blob | ArrayBuffer | Uint8Array | string} data
   * @returns {Promise<{path: string, bytes: number}>}
   */
  upload(id, path, data) {
    return this.rest("PUT", filesPath(id, path), data);
  }

  /**
   * Download a file over REST.
   * @param {string} id @param {string} path  relative to /work, or absolute
   * @returns {Promise<Blob>}
   */
  async download(id, path) {
    return (await this.#call("GET", filesPath(id, path), undefined)).blob();
  }

  /**
   * Remove a file, or a folder with everything in it, over REST.
   * @param {string} id @param {string} path  relative to /work, or absolute
   */
  async removeFile(id, path) {
    await this.rest("DELETE", filesPath(id, path));
  }

  // -- volumes (docs/storage.md) ---------------------------------------------------------------------

  /**
   * Create a named volume: a file system of `quota_mb` that outlives the sandboxes mounting it
   * (`createSandbox({volumes: {"/data": {name}}})`).
   * @param {string} name @param {{quota_mb?: number, runtime?: string}} [options]
   * @returns {Promise<any>} the volume: `name`, `quota_mb`, `store`, `used_bytes`, `mounted_by`
   */
  createVolume(name, options = {}) {
    return this.rest("POST", "/v1/volumes", { name, ...options });
  }

  /** This tenant's volumes. @returns {Promise<any[]>} */
  async listVolumes() {
    return (await this.rest("GET", "/v1/volumes")).volumes;
  }

  /** @param {string} name @returns {Promise<any>} */
  getVolume(name) {
    return this.rest("GET", `/v1/volumes/${encodeURIComponent(name)}`);
  }

  /** Delete a volume; rejects with `busy` while a sandbox mounts it. @param {string} name */
  async deleteVolume(name) {
    await this.rest("DELETE", `/v1/volumes/${encodeURIComponent(name)}`);
  }

  /**
   * Write a file into a volume no sandbox mounts.
   * @param {string} name @param {string} path @param {Blob | ArrayBuffer | Uint8Array | string} data
   * @returns {Promise<{path: string, bytes: number}>}
   */
  uploadToVolume(name, path, data) {
    return this.rest("PUT", `/v1/volumes/${encodeURIComponent(name)}/files/${encodePath(path)}`, data);
  }

  /** A file of a volume no sandbox mounts read-write. @param {string} name @param {string} path @returns {Promise<Blob>} */
  async downloadFromVolume(name, path) {
    return (await this.#call("GET", `/v1/volumes/${encodeURIComponent(name)}/files/${encodePath(path)}`,
      undefined)).blob();
  }

  // -- serverless: bodies and answers are the REST contract's (README: REST API) --------------------

  /**
   * How long a call that runs code may take: its `timeout` plus `requestTimeout`, else `callTimeout`.
   * @param {{timeout?: number}} body
   */
  #callDeadline(body) {
    return typeof body.timeout === "number" ? body.timeout * 1000 + this.options.requestTimeout
      : this.options.callTimeout;
  }

  /**
   * Call `function(...args, kwargs)` of `code` in a fresh sandbox, destroyed afterwards (`POST /v1/invoke`).
   * @param {InvokeRequest & {runtime?: string, [createOption: string]: any}} body
   *   plus create options (`runtime`, `memory_mb`, ...) for the sandbox it runs in
   * @returns {Promise<InvokeResult>}
   */
  invoke(body) {
    return this.rest("POST", "/v1/invoke", callBody(body), { timeout: this.#callDeadline(body) });
  }

  /**
   * Call a function of `code` in an existing sandbox (`POST /v1/sandboxes/{id}/invoke`); over a
   * session, `Sandbox.invoke` does the same.
   * @param {string} sandboxId @param {InvokeRequest} body
   * @returns {Promise<InvokeResult>}
   */
  invokeIn(sandboxId, body) {
    return this.rest("POST", `/v1/sandboxes/${encodeURIComponent(sandboxId)}/invoke`, callBody(body),
      { timeout: this.#callDeadline(body) });
  }

  /**
   * Run tests against code in a sandbox (`POST /v1/sandboxes/{id}/test`): pytest for Python,
   * `test(name, fn)` with the `assert` global for JavaScript.
   * @param {string} sandboxId @param {TestRequest} body
   * @returns {Promise<TestReport>}
   */
  runTests(sandboxId, body) {
    return this.rest("POST", `/v1/sandboxes/${encodeURIComponent(sandboxId)}/test`, callBody(body),
      { timeout: this.#callDeadline(body) });
  }

  /**
   * Run a command or code to its end in a fresh sandbox, destroyed afterwards (`POST /v1/execute`).
   * @param {Record<string, any>} body  a REST exec body (`code` + `language`, `code_ref` or `command`,
   *   `stdin` as text, `env`, `cwd`, `timeout`) plus create options (`runtime`, ...)
   * @returns {Promise<{exit_code: number | null, stdout: string, stderr: string, duration_ms: number,
   *   signal: string | null, exec_id: string, truncated: boolean, error?: {code: string, message: string}}>}
   */
  execute(body) {
    return this.rest("POST", "/v1/execute", callBody(body), { timeout: this.#callDeadline(body) });
  }

  /**
   * Create or replace a function (`PUT /v1/functions/{name}`); 201 and 200 both resolve.
   * @param {string} name
   * @param {{code?: string, code_ref?: string, function: string, runtime?: string, language?: string,
   *   timeout?: number, memory_mb?: number, min_instances?: number, max_instances?: number,
   *   idle_timeout?: number, env?: Record<string, string>}} spec
   * @returns {Promise<any>} the function: `name`, `version`, its settings, `instances`, `queued`
   */
  deployFunction(name, spec) {
    return this.rest("PUT", `/v1/functions/${encodeURIComponent(name)}`, callBody(spec));
  }

  /** This tenant's functions. @returns {Promise<any[]>} */
  async listFunctions() {
    return (await this.rest("GET", "/v1/functions")).functions;
  }

  /** @param {string} name @returns {Promise<any>} */
  getFunction(name) {
    return this.rest("GET", `/v1/functions/${encodeURIComponent(name)}`);
  }

  /** @param {string} name */
  async deleteFunction(name) {
    await this.rest("DELETE", `/v1/functions/${encodeURIComponent(name)}`);
  }

  /**
   * Call a deployed function. A function whose instances are all busy and whose queue is full
   * rejects with `quota_exceeded` (status 429) and `retryAfter` (seconds).
   * @param {string} name
   * @param {{args?: any[], kwargs?: Record<string, any>}} [call]
   * @param {{timeout?: number}} [options]  ms to wait for the answer (default `callTimeout`)
   * @returns {Promise<InvokeResult & {cold: boolean, instance: string, version: string}>}
   */
  invokeFunction(name, call = {}, options = {}) {
    return this.rest("POST", `/v1/functions/${encodeURIComponent(name)}/invoke`, callBody(call),
      { timeout: options.timeout ?? this.options.callTimeout });
  }

  /**
   * Start a command or code in the background (`POST .../executions`); resolves at once.
   * @param {string} sandboxId @param {Record<string, any>} body  a REST exec body (as `execute`)
   * @returns {Promise<{id: string, state: string}>}
   */
  startExecution(sandboxId, body) {
    return this.rest("POST", `/v1/sandboxes/${encodeURIComponent(sandboxId)}/executions`, callBody(body));
  }

  /**
   * An execution's state and its output from `outputOffset` on; with `wait`, answers when it ends
   * or after `timeout` seconds (the gateway's default 30, its cap 300), whichever comes first.
   * @param {string} sandboxId @param {string} executionId
   * @param {{wait?: boolean, timeout?: number, outputOffset?: number}} [options]
   * @returns {Promise<Execution>}
   */
  getExecution(sandboxId, executionId, options = {}) {
    const { wait = false, timeout, outputOffset = 0 } = options;
    const path = `/v1/sandboxes/${encodeURIComponent(sandboxId)}/executions/${encodeURIComponent(executionId)}`;
    return this.rest("GET", path + query({ wait: wait || undefined, timeout: wait ? timeout : undefined,
      output_offset: outputOffset }), undefined,
    { timeout: this.options.requestTimeout + (wait ? (timeout ?? 30) * 1000 : 0) });
  }

  /**
   * Stop a running execution (its state becomes `cancelled`); resolves with its state (no output).
   * @param {string} sandboxId @param {string} executionId @returns {Promise<Execution>}
   */
  cancelExecution(sandboxId, executionId) {
    return this.rest("DELETE",
      `/v1/sandboxes/${encodeURIComponent(sandboxId)}/executions/${encodeURIComponent(executionId)}`);
  }

  /**
   * A sandbox's executions (every exec, however started), newest first, without output.
   * @param {string} sandboxId @param {{state?: string, limit?: number}} [filter]
   * @returns {Promise<Execution[]>}
   */
  async listExecutions(sandboxId, filter = {}) {
    const path = `/v1/sandboxes/${encodeURIComponent(sandboxId)}/executions` + query(filter);
    return (await this.rest("GET", path)).executions;
  }

  /**
   * Follow an execution: each item is one poll (held by the gateway up to `interval` seconds)
   * carrying the output since the previous item; the last item is the finished execution.
   * Nothing is repeated or skipped (each poll continues from the previous `output_offset`).
   * @param {string} sandboxId @param {string} executionId
   * @param {{interval?: number, outputOffset?: number}} [options]
   * @returns {AsyncGenerator<Execution>}
   */
  async *followExecution(sandboxId, executionId, options = {}) {
    let outputOffset = options.outputOffset ?? 0;
    for (;;) {
      const info = await this.getExecution(sandboxId, executionId,
        { wait: true, timeout: options.interval ?? 1, outputOffset });
      outputOffset = info.output_offset ?? outputOffset;
      yield info;
      if (finished(info)) return;
    }
  }

  /**
   * Wait for an execution to end; resolves with it and all of its output. Rejects with `timeout`
   * after `timeout` seconds (it runs on).
   * @param {string} sandboxId @param {string} executionId
   * @param {{timeout?: number, interval?: number}} [options]
   * @returns {Promise<Execution>}
   */
  async waitExecution(sandboxId, executionId, options = {}) {
    const { timeout, interval = 20 } = options;
    const deadline = timeout === undefined ? Infinity : Date.now() + timeout * 1000;
    let stdout = "";
    let stderr = "";
    let outputOffset = 0;
    for (;;) {
      const hold = Math.max(0, Math.min(interval, (deadline - Date.now()) / 1000));
      const info = await this.getExecution(sandboxId, executionId, { wait: true, timeout: hold, outputOffset });
      stdout += info.stdout;
      stderr += info.stderr;
      outputOffset = info.output_offset ?? outputOffset;
      if (finished(info)) return { ...info, stdout, stderr };
      if (Date.now() >= deadline) {
        throw new SandgateError("timeout", `execution ${executionId} is still ${info.state} after ${timeout} s`);
      }
    }
  }

  /** The tenant's cached code, most recently used first (`hash` works as `code_ref`). @returns {Promise<any[]>} */
  async cacheEntries() {
    return (await this.rest("GET", "/v1/cache")).entries;
  }

  async clearCache() {
    await this.rest("DELETE", "/v1/cache");
  }

  /** @param {string} hash */
  async deleteCacheEntry(hash) {
    await this.rest("DELETE", `/v1/cache/${encodeURIComponent(hash)}`);
  }
}

/**
 * A call's body for the gateway: `files` values that are bytes become `{base64}` (JSON has no bytes).
 * @param {Record<string, any>} body
 */
function callBody(body) {
  if (!body || typeof body !== "object") throw new TypeError("the call needs a body object");
  const out = clean(body);
  if (out.files) {
    out.files = Object.fromEntries(Object.entries(out.files).map(([path, data]) =>
      [path, typeof data === "string" ? data : { base64: toBase64(asBytes(data)) }]));
  }
  return out;
}

/** @param {Record<string, string | number | boolean | undefined>} params */
function query(params) {
  const entries = Object.entries(params).filter(([, value]) => value !== undefined);
  return entries.length ? "?" + new URLSearchParams(entries.map(([k, v]) => [k, String(v)])).toString() : "";
}

const FINISHED = new Set(["completed", "failed", "cancelled", "timeout"]);
/** Whether an execution has ended (a state newer than this client counts once it has an end time). */
const finished = (/** @type {any} */ info) => FINISHED.has(info.state) || info.ended_at != null;

/** @param {string} path */
function encodePath(path) {
  return path.replace(/^\/+/, "").split("/").map(encodeURIComponent).join("/");
}

/** A sandbox file's REST path: `files?path=` takes relative and absolute paths alike. */
function filesPath(id, path) {
  return `/v1/sandboxes/${encodeURIComponent(id)}/files?path=${encodeURIComponent(path)}`;
}

// ------------------------------------------------------------------------------------------------
// Sandbox: one WebSocket session, reconnecting
// ------------------------------------------------------------------------------------------------

/**
 * @typedef {object} Pending
 * @property {(result: any) => void} resolve
 * @property {(error: SandgateError) => void} reject
 * @property {ReturnType<typeof setTimeout>} deadline
 * @property {Record<string, any> | null} queued  the message, while it waits for a connection
 * @property {Record<string, any> | null} resend  the message, when an idempotent op may be sent again after a drop
 */

/**
 * A session on one sandbox. Obtain it with `Gateway.connect` or `Gateway.createSandbox`.
 *
 * Events (`on(type, fn)`): `state` ({state, attempt?, error?}) whenever the connection state changes;
 * `reconnected` ({attempt, resumed}) after a reconnect resumed `resumed` streams.
 */
export class Sandbox extends Emitter {
  /** @type {SessionState} */
  state = "connecting";
  /** What `hello` said: the gateway's version and the sandbox's capabilities. */
  hello = /** @type {any} */ (null);
  /** How many times this session reconnected. */
  reconnects = 0;

  /** @type {WebSocket | null} */
  #ws = null;
  #nextId = 1;
  /** @type {Map<number, Pending>} */
  #pending = new Map();
  /** @type {Map<number, Stream>} request id -> the stream it carries */
  #streams = new Map();
  #lastReceived = Date.now();
  /** @type {ReturnType<typeof setInterval> | null} */
  #watchdog = null;
  #pinging = false;
  /** @type {SandgateError | null} */
  #closedWith = null;

  /**
   * @param {Gateway} gateway @param {string} id
   * @param {{subprotocol: string, encode(m: any): string | Uint8Array, decode(p: any): any}} codec
   */
  constructor(gateway, id, codec) {
    super();
    this.gateway = gateway;
    this.id = id;
    this.codec = codec;
    this.files = new Files(this);
    this.ports = new Ports(this);
    /** Resolves once the first connection said hello; rejects with why it could not. */
    this.ready = this.#open().then(
      () => {
        this.#setState("open");
        this.#startWatchdog();
        this.#flushQueue();
        return this;
      },
      async (err) => {
        const error = (await this.#whyUnreachable(err)) ?? err;
        this.#finish(error);
        throw error;
      },
    );
  }

  /** The capabilities `hello` reported (`exec.pty`, `exec.process`, `fs`, ...). @returns {Set<string>} */
  get capabilities() {
    return new Set(this.hello?.capabilities ?? []);
  }

  /** @param {SessionState} state @param {object} [detail] */
  #setState(state, detail = {}) {
    this.state = state;
    this.emit("state", { state, ...detail });
  }

  // -- the connection -------------------------------------------------------------------------

  /** Open a socket and say hello; rejects (after cleaning up) if either fails. */
  async #open() {
    const { WebSocket: Socket = globalThis.WebSocket, connectTimeout } = this.gateway.options;
    if (!Socket) throw new TypeError("no WebSocket: pass {WebSocket} (Node 20 needs --experimental-websocket)");
    const url = this.gateway.url.replace(/^http/, "ws") + `/v1/sandboxes/${encodeURIComponent(this.id)}/ws`;
    const ws = new Socket(url, [this.codec.subprotocol, bearerSubprotocol(this.gateway.options.apiKey)]);
    ws.binaryType = "arraybuffer";
    await new Promise((resolve, reject) => {
      const deadline = timer(() => fail("no answer in time"), connectTimeout);
      const fail = (/** @type {string} */ why) => {
        clearTimeout(deadline);
        abandon(ws);
        // A browser never sees the upgrade's HTTP status; callers ask REST what went wrong.
        reject(new SandgateError("disconnected", `WebSocket to ${url} failed: ${why}`, true));
      };
      ws.onopen = () => {
        clearTimeout(deadline);
        resolve(undefined);
      };
      ws.onerror = () => fail("connection refused or closed");
      ws.onclose = (event) => fail(`closed with ${event.code}`);
    });
    if (ws.protocol !== this.codec.subprotocol) {
      abandon(ws);
      throw new SandgateError("unsupported", `the gateway chose subprotocol '${ws.protocol}'`);
    }
    ws.onmessage = (event) => this.#receive(ws, event.data);
    ws.onclose = (event) => this.#lost(ws, event.code, event.reason);
    ws.onerror = null;
    this.#ws = ws;
    this.#lastReceived = Date.now();
    try {
      this.hello = await this.#requestNow("hello", { version: 1 }, connectTimeout);
    } catch (err) {
      this.#ws = null;
      abandon(ws);
      throw err;
    }
  }

  /** @param {WebSocket} ws @param {any} payload */
  #receive(ws, payload) {
    if (ws !== this.#ws) return;
    this.#lastReceived = Date.now();
    let message;
    try {
      message = this.codec.decode(payload);
    } catch (err) {
      console.error("sandgate: undecodable message", err);
      return;
    }
    const id = message.id;
    if (message.ev !== undefined) {
      this.#streams.get(id)?._event(message);
      return;
    }
    const pending = this.#pending.get(id);
    if (pending) {
      this.#pending.delete(id);
      clearTimeout(pending.deadline);
      if (message.error) pending.reject(SandgateError.fromWire(message.error));
      else pending.resolve(message.result);
      return;
    }
    const stream = this.#streams.get(id);
    if (stream) stream._reply(message);
    else if (message.error) console.warn("sandgate: error for no request", message.error);
  }

  /**
   * The socket closed (or was abandoned): reconnect, unless the close says that cannot help.
   * @param {WebSocket} ws @param {number} code @param {string} reason
   */
  #lost(ws, code, reason) {
    if (ws !== this.#ws || this.#closedWith) return;
    this.#ws = null;
    if (code === CLOSE_DESTROYED) {
      this.#finish(new SandgateError("not_found", `the sandbox was destroyed (${reason || code})`));
    } else if (code === CLOSE_PROTOCOL_ERROR) {
      this.#finish(new SandgateError("bad_request", `the gateway closed the session: ${reason || code}`));
    } else {
      const why = `closed with ${code}${reason ? `: ${reason}` : ""}`;
      this.#failInFlight(why);
      // The first connection's failure is `ready`'s to report; later ones reconnect.
      if (this.state !== "connecting") this.#startReconnect(why);
    }
  }

  /** A request sent on a dead socket may or may not have run: its caller decides (retryable). @param {string} why */
  #failInFlight(why) {
    for (const [id, pending] of this.#pending) {
      if (pending.resend) pending.queued = pending.resend; // idempotent: sent again on the next connection
      if (pending.queued) continue;
      this.#pending.delete(id);
      clearTimeout(pending.deadline);
      pending.reject(new SandgateError("disconnected", `the connection dropped (${why})`, true));
    }
  }

  /** Send what was asked for while there was no connection, in order. */
  #flushQueue() {
    for (const pending of this.#pending.values()) {
      if (!pending.queued || !this.#ws) continue; // no socket: the next reconnect sends it
      this.#transmit(pending.queued);
      pending.queued = null;
    }
  }

  /** Give up on the current socket (dead or stalled) and reconnect. @param {string} why */
  #drop(why) {
    const ws = this.#ws;
    if (!ws) return;
    this.#ws = null;
    abandon(ws);
    this.#failInFlight(why);
    this.#startReconnect(why);
  }

  /** @param {string} why */
  #startReconnect(why) {
    this.#reconnect(why).catch((err) => this.#finish(err instanceof SandgateError ? err
      : new SandgateError("internal", `reconnect failed: ${err}`)));
  }

  /** @param {string} why */
  async #reconnect(why) {
    if (this.state === "reconnecting" || this.#closedWith) return;
    this.#setState("reconnecting", { attempt: 0, reason: why });
    const giveUpAt = Date.now() + this.gateway.options.reconnectFor;
    for (let attempt = 1; !this.#closedWith; attempt++) {
      this.#setState("reconnecting", { attempt, reason: why });
      try {
        await this.#open();
        break;
      } catch (err) {
        if (this.#closedWith) return;
        const fatal = await this.#whyUnreachable(err);
        if (fatal) return this.#finish(fatal);
        if (Date.now() >= giveUpAt) {
          return this.#finish(new SandgateError("disconnected", `could not reconnect: ${why}`, true));
        }
      }
      // Back off (0.25 s doubling to 5 s, with jitter) so a gateway coming back is not stampeded.
      const wait = Math.min(5000, 250 * 2 ** Math.min(attempt - 1, 5)) * (0.75 + Math.random() / 2);
      await new Promise((resolve) => timer(() => resolve(undefined), wait));
    }
    if (this.#closedWith) return;
    this.reconnects++;
    const streams = [...new Set(this.#streams.values())];
    this.#streams.clear();
    for (const stream of streams) {
      stream.heard = false;
      stream.lastEventAt = Date.now(); // the time spent reconnecting is not the stream's silence
      stream._resume();
    }
    this.#flushQueue();
    this.#setState("open", { attempt: this.reconnects });
    this.emit("reconnected", { attempt: this.reconnects, resumed: streams.length });
  }

  /**
   * After a failed reconnect: the error that makes retrying pointless, or null. A browser cannot
   * read a refused upgrade's status, so ask REST about the sandbox.
   * @param {unknown} err
   */
  async #whyUnreachable(err) {
    if (err instanceof SandgateError && err.code === "unsupported") return err;
    try {
      const info = await this.gateway.getSandbox(this.id);
      if (info.state !== "running") return new SandgateError("guest_died", `the sandbox is ${info.state}`);
    } catch (restErr) {
      if (restErr instanceof SandgateError && !restErr.retryable
          && ["not_found", "unauthorized", "forbidden_origin"].includes(restErr.code)) {
        return restErr;
      }
    }
    return null;
  }

  /** End the session for good: every request rejects, every stream ends with `error`. @param {SandgateError} error */
  #finish(error) {
    if (this.#closedWith) return;
    this.#closedWith = error;
    if (this.#watchdog !== null) clearInterval(this.#watchdog);
    const ws = this.#ws;
    this.#ws = null;
    if (ws) abandon(ws);
    for (const pending of this.#pending.values()) {
      clearTimeout(pending.deadline);
      pending.reject(error);
    }
    this.#pending.clear();
    for (const stream of new Set(this.#streams.values())) stream._abort(error);
    this.#streams.clear();
    this.#setState("closed", { error });
  }

  #startWatchdog() {
    const { pingInterval, pingTimeout, streamIdleTimeout } = this.gateway.options;
    const every = Math.max(250, Math.min(pingInterval, streamIdleTimeout) / 4);
    this.#watchdog = setInterval(() => {
      if (this.state !== "open" || !this.#ws) return;
      const now = Date.now();
      for (const stream of this.#streams.values()) {
        // The gateway starts keepalives on a subscription once it delivered an event on it, so a
        // stream re-attached with nothing new to say is covered by the pings instead.
        if (stream.heard && now - stream.lastEventAt > streamIdleTimeout) {
          return this.#drop(`no event on ${stream.describe()} for ${streamIdleTimeout} ms`);
        }
      }
      if (!this.#pinging && now - this.#lastReceived >= pingInterval) {
        this.#pinging = true;
        const ws = this.#ws;
        this.#requestNow("ping", {}, pingTimeout)
          .catch((err) => {
            if (err.code === "timeout" && ws === this.#ws) this.#drop("ping unanswered");
          })
          .finally(() => { this.#pinging = false; });
      }
    }, every);
    /** @type {any} */ (this.#watchdog).unref?.();
  }

  // -- requests -------------------------------------------------------------------------------

  /** @param {Record<string, any>} message */
  #transmit(message) {
    const ws = this.#ws;
    if (!ws) throw new SandgateError("disconnected", "no connection", true);
    ws.send(this.codec.encode(message));
  }

  /**
   * A request with a deadline; waits for the connection while reconnecting.
   * @param {string} op
   * @param {Record<string, any>} [fields]
   * @param {number} [timeout]  ms; default the gateway's `requestTimeout`
   * @returns {Promise<any>} the result
   * @throws {SandgateError}
   */
  request(op, fields = {}, timeout = undefined) {
    if (this.#closedWith) return Promise.reject(this.#closedWith);
    if (this.state === "open") return this.#requestNow(op, fields, timeout, true);
    const message = { ...fields, id: this.#nextId++, op };
    return this.#await(message, timeout, true, true);
  }

  /**
   * @param {string} op @param {Record<string, any>} fields @param {number} [timeout]
   * @param {boolean} [resendable]  a caller's request (not the connection's own hello or ping)
   */
  #requestNow(op, fields, timeout, resendable = false) {
    const message = { ...fields, id: this.#nextId++, op };
    const promise = this.#await(message, timeout, false, resendable);
    try {
      this.#transmit(message);
    } catch (err) {
      const pending = this.#pending.get(message.id);
      this.#pending.delete(message.id);
      if (pending) clearTimeout(pending.deadline);
      return Promise.reject(err);
    }
    return promise;
  }

  /**
   * @param {Record<string, any>} message @param {number | undefined} timeout @param {boolean} queue
   * @param {boolean} [resendable]
   */
  #await(message, timeout, queue, resendable = false) {
    const ms = timeout ?? this.gateway.options.requestTimeout;
    return new Promise((resolve, reject) => {
      const deadline = timer(() => {
        this.#pending.delete(message.id);
        reject(new SandgateError("timeout", `${message.op} got no answer in ${ms} ms`, true));
      }, ms);
      const resend = resendable && IDEMPOTENT_OPS.has(message.op) ? message : null;
      this.#pending.set(message.id, { resolve, reject, deadline, queued: queue ? message : null, resend });
    });
  }

  /**
   * Send a stream request under a fresh id and route its events to `stream`.
   * @param {Stream} stream @param {string} op @param {Record<string, any>} fields
   * @returns {number} the request id
   * @internal
   */
  _openStream(stream, op, fields) {
    const id = this.#nextId++;
    this.#streams.set(id, stream);
    // A live socket is enough (not "open"): resumes are sent while the reconnect finishes.
    if (this.#ws) {
      try {
        this.#transmit({ ...fields, id, op });
      } catch {
        // the socket just died: the reconnect resumes this stream like any other
      }
    }
    return id;
  }

  /** @param {number} id @internal */
  _closeStream(id) {
    this.#streams.delete(id);
  }

  // -- operations -----------------------------------------------------------------------------

  /**
   * Start an exec; its output streams to `handlers` (and survives reconnects).
   * @param {ExecRequest} request
   * @param {ExecHandlers} [handlers]
   * @returns {Exec}
   */
  exec(request, handlers = {}) {
    if (this.#closedWith) throw this.#closedWith;
    const { code, codeRef, command } = request;
    if ([code, codeRef, command].filter((given) => given !== undefined).length !== 1) {
      throw new TypeError("exec needs exactly one of {code} (with {language}), {codeRef} or {command}");
    }
    const fields = clean({
      exec_id: request.execId ?? randomId(),
      tag: request.tag,
      language: code !== undefined ? (request.language ?? "python") : codeRef !== undefined ? request.language
        : undefined,
      code,
      code_ref: codeRef,
      command,
      namespace: request.namespace,
      stdin: request.stdin === undefined ? undefined : asBytes(request.stdin),
      stdin_open: request.stdinOpen,
      env: request.env,
      cwd: request.cwd,
      timeout: request.timeout,
      pty: request.pty,
    });
    return new Exec(this, fields.exec_id, request.tag, handlers, fields);
  }

  /**
   * Follow an exec started elsewhere (another tab, a previous page load), replaying from `fromSeq`.
   * @param {{execId?: string, tag?: string, fromSeq?: number}} which
   * @param {ExecHandlers} [handlers]
   * @returns {Exec}
   */
  attach(which, handlers = {}) {
    if (this.#closedWith) throw this.#closedWith;
    if (!which.execId && !which.tag) throw new TypeError("attach needs {execId} or {tag}");
    return new Exec(this, which.execId ?? null, which.tag, handlers, null, which.fromSeq ?? 0);
  }

  /**
   * Run to the end and collect the output as text, and the rich output (`display`).
   * @param {ExecRequest} request
   * @returns {Promise<ExecResult & {stdout: string, stderr: string, pty: string, display: DisplayBundle[]}>}
   */
  async run(request) {
    /** @type {Record<string, TextDecoder>} */
    const decoders = {};
    /** @type {Record<string, string>} */
    const text = { stdout: "", stderr: "", pty: "" };
    /** @type {DisplayBundle[]} */
    const display = [];
    const exec = this.exec(request, {
      onData: (data, fd) => {
        text[fd] += (decoders[fd] ??= new TextDecoder()).decode(data, { stream: true });
      },
      onDisplay: (bundle) => display.push(bundle),
    });
    const result = await exec.wait();
    for (const fd of Object.keys(decoders)) text[fd] += decoders[fd].decode();
    return { ...result, stdout: text.stdout, stderr: text.stderr, pty: text.pty, display };
  }

  /**
   * Call a function of `code` in this sandbox over the session (the `invoke` op).
   * @param {InvokeRequest} request
   * @returns {Promise<InvokeResult>}
   */
  invoke(request) {
    return this.request("invoke", callBody(request), this.#callDeadline(request));
  }

  /**
   * Run tests against code in this sandbox over the session (the `test` op).
   * @param {TestRequest} request
   * @returns {Promise<TestReport>}
   */
  runTests(request) {
    return this.request("test", callBody(request), this.#callDeadline(request));
  }

  /** @param {{timeout?: number}} request */
  #callDeadline(request) {
    const { requestTimeout, callTimeout } = this.gateway.options;
    return typeof request.timeout === "number" ? request.timeout * 1000 + requestTimeout : callTimeout;
  }

  /** @returns {Promise<{execs: {exec_id: string, tag: string | null, pid: number | null, running: boolean, exit_code: number | null}[]}>} */
  listExecs() {
    return this.request("exec.list");
  }

  /** `{guest: {...}, host: {...}}` (docs/protocol.md §3). @returns {Promise<any>} */
  metrics() {
    return this.request("metrics");
  }

  /** The sandbox's description (as `GET /v1/sandboxes/{id}`). @returns {Promise<any>} */
  info() {
    return this.request("sandbox.info");
  }

  /** @returns {Promise<{}>} */
  ping() {
    return this.request("ping");
  }

  /** Destroy the sandbox; the gateway then closes this session (4404). */
  async destroy() {
    try {
      await this.request("sandbox.destroy");
    } catch (err) {
      // The gateway's 4404 close can overtake its reply: that close is the confirmation.
      if (!(err instanceof SandgateError && err.code === "not_found")) throw err;
    }
    this.#finish(new SandgateError("not_found", "the sandbox was destroyed"));
  }

  /** Close this session. Execs keep running in the sandbox; another session can `attach` to them. */
  close() {
    this.#finish(new SandgateError("closed", "the session was closed"));
  }
}

/** @param {WebSocket} ws */
function abandon(ws) {
  ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
  try {
    ws.close(1000);
  } catch {
    // already closing
  }
}

// ------------------------------------------------------------------------------------------------
// Streams
// ------------------------------------------------------------------------------------------------

/** What the session needs of a stream. @abstract */
class Stream {
  lastEventAt = Date.now();
  /** Whether an event arrived on the current subscription (only then are keepalives due). */
  heard = false;
  /** @param {any} message @internal */
  _event(message) {}
  /** @param {any} message @internal */
  _reply(message) {}
  /** @internal */
  _resume() {}
  /** @param {SandgateError} error @internal */
  _abort(error) {}
  describe() {
    return "a stream";
  }
}

/** A running (or finished) exec: its output arrives through the handlers given to `exec`/`attach`. */
export class Exec extends Stream {
  /** @type {number | null} */
  pid = null;
  /** @type {ExecResult | null} */
  result = null;
  /** The last sequence number delivered; -1 before `start`. */
  lastSeq = -1;

  #sandbox;
  #handlers;
  /** @type {Record<string, any> | null} the exec.start fields, until the exec is known to exist */
  #startFields;
  #requestId = 0;
  /** @type {(result: ExecResult) => void} */
  #resolve = () => {};
  /** @type {(error: SandgateError) => void} */
  #reject = () => {};
  #done;

  /**
   * @param {Sandbox} sandbox @param {string | null} execId @param {string | undefined} tag
   * @param {ExecHandlers} handlers @param {Record<string, any> | null} startFields
   * @param {number} [fromSeq]
   */
  constructor(sandbox, execId, tag, handlers, startFields, fromSeq = 0) {
    super();
    this.lastSeq = fromSeq - 1; // an attach from N has nothing before N to lose
    this.#sandbox = sandbox;
    this.execId = execId;
    this.tag = tag;
    this.#handlers = handlers;
    this.#startFields = startFields;
    this.#done = new Promise((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    this.#done.catch(() => {}); // a refusal is reported through wait(); never unhandled
    if (startFields) this.#requestId = sandbox._openStream(this, "exec.start", startFields);
    else this.#attach(fromSeq);
  }

  get running() {
    return this.result === null;
  }

  describe() {
    return `exec ${this.execId ?? this.tag}`;
  }

  /**
   * Resolves when the exec ends (with `error` set if it started and then failed); rejects if the
   * gateway refused to start it (or to attach).
   * @returns {Promise<ExecResult>}
   */
  wait() {
    return this.#done;
  }

  /** @param {number} fromSeq */
  #attach(fromSeq) {
    this.#requestId = this.#sandbox._openStream(this, "exec.attach",
      clean({ exec_id: this.execId ?? undefined, tag: this.execId ? undefined : this.tag, from_seq: fromSeq }));
  }

  /** @param {any} message @internal */
  _event(message) {
    this.lastEventAt = Date.now();
    this.heard = true;
    if (message.ev === "keepalive" || this.result) return;
    const seq = message.seq;
    if (seq <= this.lastSeq) return; // replayed after a reconnect: already delivered
    if (seq > this.lastSeq + 1) this.#handlers.onLost?.([this.lastSeq + 1, seq - 1]);
    this.lastSeq = seq;
    this.#startFields = null; // the gateway has it: never start it again
    if (message.ev === "start") {
      this.execId = message.exec_id;
      this.pid = message.pid ?? null;
      this.#handlers.onStart?.({ execId: message.exec_id, pid: this.pid });
    } else if (message.ev === "data") {
      this.#handlers.onData?.(message.data, message.fd);
    } else if (message.ev === "display") {
      this.#handlers.onDisplay?.(message.bundle);
    } else if (message.ev === "end") {
      this.#end(message);
    }
  }

  /** @param {any} message @internal */
  _reply(message) {
    this.lastEventAt = Date.now();
    if (!message.error) {
      if (message.result?.exec_id) this.execId = message.result.exec_id; // attach by tag
      return;
    }
    const error = SandgateError.fromWire(message.error);
    if (error.code === "not_found" && this.#startFields && this.lastSeq < 0) {
      // Resumed an exec.start that never reached the gateway (the drop came first): send it now.
      this.#sandbox._closeStream(this.#requestId);
      this.#requestId = this.#sandbox._openStream(this, "exec.start", this.#startFields);
      return;
    }
    this.#sandbox._closeStream(this.#requestId);
    this.result = { execId: this.execId ?? "", exitCode: null, signal: null, durationMs: null, truncated: false,
      error: error.toWire() };
    this.#reject(error);
  }

  /** @internal */
  _resume() {
    if (this.result) return;
    if (this.execId) {
      this.#requestId = this.#sandbox._openStream(this, "exec.attach",
        { exec_id: this.execId, from_seq: this.lastSeq + 1 });
    } else {
      this.#attach(this.lastSeq + 1);
    }
  }

  /** @param {SandgateError} error @internal */
  _abort(error) {
    if (this.result) return;
    this.#end({ exit_code: null, signal: null, duration_ms: null, error: error.toWire() });
  }

  /** @param {any} end */
  #end(end) {
    this.#sandbox._closeStream(this.#requestId);
    this.result = {
      execId: this.execId ?? "", exitCode: end.exit_code ?? null, signal: end.signal ?? null,
      durationMs: end.duration_ms ?? null, truncated: Boolean(end.truncated), error: end.error,
    };
    this.#handlers.onEnd?.(this.result);
    this.#resolve(this.result);
  }

  #target() {
    return this.execId ? { exec_id: this.execId } : { tag: this.tag };
  }

  /** Write to stdin (the exec needs `stdinOpen` or `pty`). @param {string | Uint8Array} data */
  write(data) {
    return this.#sandbox.request("exec.input", { ...this.#target(), data: asBytes(data) });
  }

  closeStdin() {
    return this.#sandbox.request("exec.close_stdin", this.#target());
  }

  /** @param {string | number} signal  e.g. "SIGINT" */
  signal(signal) {
    return this.#sandbox.request("exec.signal", { ...this.#target(), signal });
  }

  /** Resize the exec's PTY. @param {number} rows @param {number} cols */
  resize(rows, cols) {
    return this.#sandbox.request("exec.resize", { ...this.#target(), rows, cols });
  }
}

/** One `fs.read`; after a reconnect it continues from the bytes already received. */
class FileRead extends Stream {
  /** @type {Uint8Array[]} */
  chunks = [];
  received = 0;
  #sandbox;
  #path;
  #offset;
  #length;
  #requestId;
  /** @type {(data: Uint8Array) => void} */
  #resolve = () => {};
  /** @type {(error: SandgateError) => void} */
  #reject = () => {};

  /** @param {Sandbox} sandbox @param {string} path @param {number} offset @param {number | undefined} length */
  constructor(sandbox, path, offset, length) {
    super();
    this.#sandbox = sandbox;
    this.#path = path;
    this.#offset = offset;
    this.#length = length;
    /** @type {Promise<Uint8Array>} */
    this.done = new Promise((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    this.#requestId = this.#open();
  }

  #open() {
    return this.#sandbox._openStream(this, "fs.read", clean({
      path: this.#path, offset: this.#offset + this.received,
      length: this.#length === undefined ? undefined : this.#length - this.received,
    }));
  }

  describe() {
    return `read of ${this.#path}`;
  }

  /** @param {any} message @internal */
  _event(message) {
    this.lastEventAt = Date.now();
    this.heard = true;
    if (message.ev === "data") {
      this.chunks.push(message.data);
      this.received += message.data.length;
    } else if (message.ev === "end") {
      this.#sandbox._closeStream(this.#requestId);
      if (message.error) return this.#reject(SandgateError.fromWire(message.error));
      const out = new Uint8Array(this.received);
      let at = 0;
      for (const chunk of this.chunks) {
        out.set(chunk, at);
        at += chunk.length;
      }
      this.#resolve(out);
    }
  }

  /** @param {any} message @internal */
  _reply(message) {
    this.#sandbox._closeStream(this.#requestId);
    this.#reject(SandgateError.fromWire(message.error ?? { code: "guest_protocol", message: "unexpected reply" }));
  }

  /** @internal */
  _resume() {
    this.#requestId = this.#open();
  }

  /** @param {SandgateError} error @internal */
  _abort(error) {
    this.#reject(error);
  }
}

/**
 * @typedef {object} WatchChange
 * @property {"created" | "modified" | "deleted" | "moved" | "overflow"} kind  `overflow`: changes were
 *   lost (re-list the directory): the guest's queue was full, the sandbox's agent restarted, or a
 *   reconnect came too late for the gateway's replay buffer
 * @property {string} path  relative to the watched directory
 * @property {boolean} dir
 * @property {string | null} src  a move's old path
 * @property {number} seq
 */

/**
 * @typedef {object} WatchHandlers
 * @property {(info: {watchId: string, backend: string}) => void} [onStart]
 * @property {(change: WatchChange) => void} [onChange]
 * @property {(end: {error: any}) => void} [onEnd]  after `stop()` (no error), or when the watch failed
 */

/**
 * A directory's changes (`files.watch`, fs.watch): each arrives through `onChange`, in order, once,
 * also across reconnects (the watch is re-attached by its id from the last change delivered).
 */
export class Watch extends Stream {
  /** `inotify` or `poll`, once started. @type {string | null} */
  backend = null;
  /** The last sequence number delivered; -1 before `start`. */
  lastSeq = -1;
  /** Set once the watch ended: `{error}` (null after a stop). @type {{error: any} | null} */
  ended = null;

  #sandbox;
  #handlers;
  /** @type {Record<string, any> | null} the fs.watch fields, until the watch is known to exist */
  #startFields;
  #requestId = 0;
  /** @type {(value: Watch) => void} */
  #startedResolve = () => {};
  /** @type {(error: SandgateError) => void} */
  #startedReject = () => {};
  #started;
  /** @type {(value: {error: any}) => void} */
  #endResolve = () => {};
  #done;

  /** @param {Sandbox} sandbox @param {Record<string, any>} fields @param {WatchHandlers} handlers */
  constructor(sandbox, fields, handlers) {
    super();
    this.#sandbox = sandbox;
    this.#handlers = handlers;
    this.watchId = fields.watch_id;
    this.#startFields = fields;
    this.#started = new Promise((resolve, reject) => {
      this.#startedResolve = resolve;
      this.#startedReject = reject;
    });
    this.#started.catch(() => {}); // a refusal is reported through started(); never unhandled
    this.#done = new Promise((resolve) => { this.#endResolve = resolve; });
    this.#requestId = sandbox._openStream(this, "fs.watch", fields);
  }

  describe() {
    return `watch ${this.watchId}`;
  }

  /** Resolves once the guest watches; rejects with the gateway's refusal. @returns {Promise<Watch>} */
  started() {
    return this.#started;
  }

  /** Resolves when the watch ended: `{error}` (null after `stop()`). @returns {Promise<{error: any}>} */
  wait() {
    return this.#done;
  }

  /** Stop watching; `onEnd` follows. */
  stop() {
    return this.#sandbox.request("fs.unwatch", { watch_id: this.watchId });
  }

  /** @param {any} message @internal */
  _event(message) {
    this.lastEventAt = Date.now();
    this.heard = true;
    if (message.ev === "keepalive" || this.ended) return;
    const seq = message.seq;
    if (seq <= this.lastSeq) return; // replayed after a reconnect: already delivered
    if (seq > this.lastSeq + 1 && this.lastSeq >= 0) {
      this.#handlers.onChange?.({ kind: "overflow", path: "", dir: true, src: null, seq: seq - 1 });
    }
    this.lastSeq = seq;
    this.#startFields = null; // the gateway has it: never start it again
    if (message.ev === "start") {
      this.backend = message.backend ?? null;
      this.#handlers.onStart?.({ watchId: this.watchId, backend: this.backend ?? "" });
      this.#startedResolve(this);
    } else if (message.ev === "change") {
      this.#handlers.onChange?.({ kind: message.change, path: message.path, dir: Boolean(message.dir),
        src: message.src ?? null, seq });
    } else if (message.ev === "end") {
      this.#end(message.error ?? null);
    }
  }

  /** @param {any} message @internal */
  _reply(message) {
    this.lastEventAt = Date.now();
    if (!message.error) return;
    const error = SandgateError.fromWire(message.error);
    if (error.code === "not_found" && this.#startFields && this.lastSeq < 0) {
      // Resumed an fs.watch that never reached the gateway (the drop came first): send it now.
      this.#sandbox._closeStream(this.#requestId);
      this.#requestId = this.#sandbox._openStream(this, "fs.watch", this.#startFields);
      return;
    }
    this.#startedReject(error);
    this.#end(error.toWire());
  }

  /** @internal */
  _resume() {
    if (this.ended) return;
    this.#requestId = this.#sandbox._openStream(this, "exec.attach", { exec_id: this.watchId, from_seq: this.lastSeq + 1 });
  }

  /** @param {SandgateError} error @internal */
  _abort(error) {
    if (this.ended) return;
    this.#startedReject(error);
    this.#end(error.toWire());
  }

  /** @param {any} error */
  #end(error) {
    this.#sandbox._closeStream(this.#requestId);
    this.ended = { error };
    this.#handlers.onEnd?.(this.ended);
    this.#endResolve(this.ended);
  }
}

/** `sandbox.files`: the fs ops (docs/protocol.md §3); paths are relative to the sandbox's root. */
/**
 * A published port as the client shows it: its absolute `url` on the gateway, its `token`, and the
 * `previewUrl` to open in a browser (its `?token=` becomes the port's cookie, then leaves the address bar).
 * @typedef {{port: number, url: string, token: string, previewUrl: string, connections: number}} PublishedPort
 */

/**
 * The sandbox's published ports (`sandbox.ports`): its servers, served by the gateway at
 * `/v1/sandboxes/{id}/ports/{port}/` for HTTP and WebSockets (microVM and pod; WASM has no sockets).
 */
export class Ports {
  #sandbox;
  /** @param {Sandbox} sandbox */
  constructor(sandbox) {
    this.#sandbox = sandbox;
  }

  #path(suffix = "") {
    return `/v1/sandboxes/${encodeURIComponent(this.#sandbox.id)}/ports${suffix}`;
  }

  /** @param {any} wire @returns {PublishedPort} */
  #port(wire) {
    const url = this.#sandbox.gateway.url + wire.url;
    return { port: wire.port, url, token: wire.token, previewUrl: `${url}?token=${encodeURIComponent(wire.token)}`,
      connections: wire.connections ?? 0 };
  }

  /** Publish `port` (again: the same URL and token). @param {number} port @returns {Promise<PublishedPort>} */
  async publish(port) {
    return this.#port(await this.#sandbox.gateway.rest("POST", this.#path(), { port }));
  }

  /** The published ports, with their tokens. @returns {Promise<PublishedPort[]>} */
  async list() {
    return (await this.#sandbox.gateway.rest("GET", this.#path())).ports.map((/** @type {any} */ p) => this.#port(p));
  }

  /** Unpublish `port`: its token stops working and its connections are cut. @param {number} port */
  async unpublish(port) {
    await this.#sandbox.gateway.rest("DELETE", this.#path(`/${Number(port)}`));
  }
}

export class Files {
  #sandbox;
  /** @param {Sandbox} sandbox */
  constructor(sandbox) {
    this.#sandbox = sandbox;
  }

  /**
   * @param {string} path
   * @param {{offset?: number, length?: number}} [range]
   * @returns {Promise<Uint8Array>}
   */
  read(path, range = {}) {
    return new FileRead(this.#sandbox, path, range.offset ?? 0, range.length).done;
  }

  /** @param {string} path @returns {Promise<string>} */
  async readText(path) {
    return new TextDecoder().decode(await this.read(path));
  }

  /**
   * Write a whole file, creating its directory, in chunks of at most 512 KiB (the first truncates).
   * `Gateway.upload` streams very large files over HTTP instead.
   * @param {string} path
   * @param {string | Uint8Array | ArrayBuffer} data
   * @returns {Promise<{bytes: number, size: number}>}
   */
  async write(path, data) {
    const bytes = asBytes(data);
    const parent = path.replace(/\/+$/, "").split("/").slice(0, -1).join("/");
    if (parent) await this.mkdir(parent, true);
    let result = await this.#sandbox.request("fs.write",
      { path, data: bytes.subarray(0, MAX_WRITE_CHUNK), offset: 0, truncate: true });
    for (let at = MAX_WRITE_CHUNK; at < bytes.length; at += MAX_WRITE_CHUNK) {
      result = await this.#sandbox.request("fs.write", { path, data: bytes.subarray(at, at + MAX_WRITE_CHUNK), offset: at });
    }
    return { bytes: bytes.length, size: result.size };
  }

  /**
   * @param {string} [path]
   * @param {number} [depth]  1..16
   * @returns {Promise<{entries: {name: string, path: string, type: string, size: number, mtime: number}[], truncated: boolean}>}
   */
  list(path = ".", depth = 1) {
    return this.#sandbox.request("fs.list", { path, depth });
  }

  /** @param {string} path */
  stat(path) {
    return this.#sandbox.request("fs.stat", { path });
  }

  /** @param {string} path @param {boolean} [parents] */
  mkdir(path, parents = true) {
    return this.#sandbox.request("fs.mkdir", { path, parents });
  }

  /** @param {string} src @param {string} dst */
  move(src, dst) {
    return this.#sandbox.request("fs.move", { src, dst });
  }

  /** @param {string} path @param {boolean} [recursive] */
  remove(path, recursive = false) {
    return this.#sandbox.request("fs.remove", { path, recursive });
  }

  /**
   * Watch a directory for changes (fs.watch); `await watch.started()` to know it watches.
   * @param {string} path
   * @param {{recursive?: boolean, pollInterval?: number, tag?: string}} [options]  `pollInterval`:
   *   seconds between two looks where the guest polls (WASM)
   * @param {WatchHandlers} [handlers]
   * @returns {Watch}
   */
  watch(path, options = {}, handlers = {}) {
    return new Watch(this.#sandbox, clean({ path, recursive: options.recursive ?? false, watch_id: randomId(),
      poll_interval: options.pollInterval, tag: options.tag }), handlers);
  }
}
