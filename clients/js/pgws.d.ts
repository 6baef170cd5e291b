// Types of pgws.js (the pgws client). No build step: import pgws.js, these types come along.

/** Close codes the gateway uses. */
export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  POLICY: 1008;
  TOO_BIG: 1009;
  TOKEN_EXPIRED: 3001;
}>;

/**
 * What went wrong. `code`:
 * - `server`: the server refused a message (`detail` is its error frame); the socket stays
 * - `refresh`: an in-band token refresh was refused (the client reconnects with the token)
 * - `token`: `getToken` failed or returned nothing (the client retries)
 * - `token_expired`: a fixed `token` expired: the client stopped
 * - `gave_up`: `maxAttempts` connection attempts failed: the client stopped
 * - `not_open`: `send` while the socket is not open
 * - `invalid`: a message the server would refuse (a NUL character)
 * - `disconnected`, `closed`, `timeout`: why a `/live` request was rejected
 * - `refused`: a `/live` request answered `ok: false` (a `LiveError`)
 * - `resubscribe`, `protocol`, `url`: see the message
 */
export declare class PgwsError extends Error {
  readonly code: string;
  readonly detail?: unknown;
  constructor(code: string, message: string, detail?: unknown);
}

/** A `/live` request the server refused; `detail` is the whole response. */
export declare class LiveError extends PgwsError {
  readonly method: string;
}

/** The claims of a JWT, not verified; null when it cannot be read. */
export declare function decodeClaims(token: string): Record<string, unknown> | null;

export interface TokenRequest {
  /** `connect` (first socket), `reconnect`, `refresh` (before expiry), `expired` (after 3001). */
  reason: 'connect' | 'reconnect' | 'refresh' | 'expired';
  /** The claims of the token in use, or null. */
  claims: Record<string, unknown> | null;
}

export interface ClientOptions {
  /** The gateway: `ws://host:3000` or `wss://host`. */
  url: string;
  /** A fixed token; or `getToken`, asked for one at every connection and before expiry. */
  token?: string;
  getToken?: (request: TokenRequest) => string | Promise<string>;
  /** First retry delay ceiling in ms (500); doubled (`factor`) per attempt up to `maxDelay` (30000). */
  initialDelay?: number;
  maxDelay?: number;
  factor?: number;
  /** Attempts in a row before the client gives up (no limit by default). */
  maxAttempts?: number;
  /** Seconds before `exp` at which the next token is fetched (30; at most half the lifetime left). */
  refreshBefore?: number;
  /** `/live` requests and in-band refreshes not answered in this many ms fail (10000). */
  requestTimeout?: number;
  /** The WebSocket class (default: the global one). */
  WebSocket?: typeof WebSocket;
  /** false: do not connect from the constructor; call `connect()`. */
  connect?: boolean;
}

export interface PgwsClientOptions extends ClientOptions {
  /** One channel; omitted: every channel of the token. */
  channel?: string;
  /**
   * true: open with `?resume` and, after a reconnection, get from the server what was missed
   * (from the last position received); `gap` is emitted only when the server could not give
   * it back (`reason: 'history'`). The server must keep a history (PGWS_HISTORY_SECONDS > 0).
   */
  resume?: boolean;
}

export interface CloseInfo {
  code: number;
  reason: string;
  /** false: the attempt never opened (the gateway was unreachable or refused the handshake). */
  wasOpen: boolean;
  reconnecting: boolean;
}

export interface Message {
  /** The envelope's channel (or the socket's channel for a raw payload). */
  channel: string | null;
  /** `WebsocketMessage`, `ConnectionOpen`, ... when the frame is an envelope. */
  event: string | null;
  /** The envelope's payload; the whole JSON when it has none; the raw text otherwise. */
  payload: unknown;
  claims: Record<string, unknown> | null;
  /** The frame as received (with `resume`: the message inside the positioned frame). */
  data: string | ArrayBuffer | Blob;
}

export interface LiveEvent {
  type: 'event';
  topic: string;
  /** `new-message`, `destroy-topic`, or a table topic's `create` / `update` / `delete`. */
  event: string;
  source?: string;
  data: unknown;
  /** Where the event is in the server's history (when it keeps one): `since` resumes after it. */
  position?: string;
}

interface Events {
  open: { reconnected: boolean };
  close: CloseInfo;
  reconnecting: { attempt: number; delay: number };
  /**
   * Messages may have been missed: `reconnect` (the client's), `listener` / `nats` (the
   * server's), `history` (a resumed socket or `/live` topic whose missed messages were no
   * longer kept); `topic` on a `/live` topic's own gap.
   */
  gap: { reason: string; topic?: string };
  error: PgwsError;
  /** A new token is in use: in-band, or by reconnecting. */
  token: { expiresAt: number | null; inBand: boolean };
}

declare class Connection<E> {
  readonly state: 'connecting' | 'open' | 'reconnecting' | 'closed';
  readonly claims: Record<string, unknown> | null;
  on<K extends keyof E>(type: K, handler: (value: E[K]) => void): () => void;
  off<K extends keyof E>(type: K, handler: (value: E[K]) => void): void;
  connect(): void;
  close(code?: number, reason?: string): void;
}

export declare class PgwsClient extends Connection<Events & { message: Message }> {
  constructor(options: PgwsClientOptions);
  /** With `resume`: the position of the last message received (`''` before the first). */
  readonly position: string;
  /** A handler for one channel's messages; returns its remover. */
  channel(name: string, handler: (message: Message) => void): () => void;
  /** Sends to the socket's channels; throws `PgwsError` `not_open` when not connected. */
  send(payload: string): void;
}

export declare class LiveClient extends Connection<Events & { event: LiveEvent }> {
  constructor(options: ClientOptions);
  request<T = unknown>(method: string, attributes?: Record<string, unknown>): Promise<T>;
  /** The position of the last event of `topic` received, when the server gives positions. */
  position(topic: string): string | undefined;
  subscribe(topic: string, handler?: (event: LiveEvent) => void): Promise<{ topic: string }>;
  unsubscribe(topic: string): Promise<{ topic: string }>;
  topic(name: string, handler: (event: LiveEvent) => void): () => void;
  publish(topic: string, message: unknown): Promise<{ topic: string }>;
  createTopic(
    name: string,
    options?: { public?: boolean },
  ): Promise<{ name: string; type: string; owner: string; public: boolean; subscribers: number }>;
  destroyTopic(name: string): Promise<unknown>;
  listTopics(): Promise<string[]>;
  getTopic(name: string): Promise<Record<string, unknown>>;
  ping(): Promise<unknown>;
}

export interface PubSubClientOptions extends Omit<ClientOptions, 'token' | 'getToken' | 'refreshBefore'> {
  /** wspubsub's domain and topic. */
  domain: string;
  topic: string;
  /** The domain's API key: given, the client is the topic's publisher; omitted, a subscriber. */
  key?: string;
}

export declare class PubSubClient extends Connection<Events & { message: { data: string | ArrayBuffer } }> {
  constructor(options: PubSubClientOptions);
  readonly publisher: boolean;
  /** Publishes a frame (publishers only; a subscriber throws `PgwsError` `invalid`). */
  send(data: string | ArrayBuffer | ArrayBufferView): void;
}
