/**
 * `createClassMeshClient`: one grpc-web transport (Connect-ES, binary format) to the ClassMesh
 * gateway and a typed client per service, with the caller's bearer token on every call and
 * a fresh `request_id` on every mutation that has none.
 */
import { createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { AdminService } from "../../../gen/ts/classmesh/admin/v1/admin_service_pb.js";
import { BreakoutService } from "../../../gen/ts/classmesh/breakout/v1/breakout_service_pb.js";
import { InteractionService } from "../../../gen/ts/classmesh/interaction/v1/interaction_service_pb.js";
import { MediaService } from "../../../gen/ts/classmesh/media/v1/media_service_pb.js";
import { RecordingService } from "../../../gen/ts/classmesh/recording/v1/recording_service_pb.js";
import { SessionService } from "../../../gen/ts/classmesh/session/v1/session_service_pb.js";

/** Where the token comes from: a fixed string, or a function asked before every call. */
export type TokenSource =
  | string
  | undefined
  | (() => string | undefined | Promise<string | undefined>);

export interface ClassMeshClientOptions {
  /** The gateway's URL, e.g. `"http://127.0.0.1:8080"` or `location.origin`. */
  baseUrl: string;
  /** Access token (JWT) sent as `Authorization: Bearer <token>`; empty = anonymous. */
  token?: TokenSource;
  /** Interceptors run after the auth and request-id interceptors. */
  interceptors?: Interceptor[];
  /** Default deadline of every call in milliseconds (streams too); unset = none. */
  defaultTimeoutMs?: number;
  /** A fetch implementation (tests, credentials). */
  fetch?: typeof globalThis.fetch;
}

/** Typed clients for every ClassMesh service over one transport. */
export interface ClassMeshClient {
  readonly transport: Transport;
  readonly sessions: Client<typeof SessionService>;
  readonly media: Client<typeof MediaService>;
  readonly interaction: Client<typeof InteractionService>;
  readonly breakouts: Client<typeof BreakoutService>;
  readonly recordings: Client<typeof RecordingService>;
  readonly admin: Client<typeof AdminService>;
  /** Replace the token (e.g. after a guest join handed out a session token). */
  setToken(token: TokenSource): void;
}

/** `Authorization: Bearer <token>` on every call whose token source yields one. */
export function bearerAuth(token: () => TokenSource): Interceptor {
  return (next) => async (req) => {
    let value = token();
    if (typeof value === "function") {
      value = await value();
    }
    if (value) {
      req.header.set("Authorization", `Bearer ${value}`);
    }
    return next(req);
  };
}

/**
 * A fresh `request_id` (idempotency key) on every unary call whose request has that field
 * and left it empty. A caller that retries a mutation itself passes its own id.
 */
export function requestIds(newId: () => string = randomId): Interceptor {
  return (next) => async (req) => {
    if (!req.stream && req.method.input.fields.some((f) => f.name === "request_id")) {
      const message = req.message as unknown as { requestId?: unknown };
      if (message.requestId === "" || message.requestId === undefined) {
        message.requestId = newId();
      }
    }
    return next(req);
  };
}

/** A random UUID v4 (works outside secure contexts, unlike `crypto.randomUUID`). */
export function randomId(): string {
  const b = new Uint8Array(16);
  globalThis.crypto.getRandomValues(b);
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** A client of every ClassMesh service through the gateway at `baseUrl`. */
export function createClassMeshClient(options: ClassMeshClientOptions): ClassMeshClient {
  let token: TokenSource = options.token;
  const transport = createGrpcWebTransport({
    baseUrl: options.baseUrl,
    // The gateway forwards protobuf bytes as they are and never transcodes JSON.
    useBinaryFormat: true,
    interceptors: [bearerAuth(() => token), requestIds(), ...(options.interceptors ?? [])],
    ...(options.defaultTimeoutMs !== undefined
      ? { defaultTimeoutMs: options.defaultTimeoutMs }
      : {}),
    ...(options.fetch !== undefined ? { fetch: options.fetch } : {}),
  });
  return {
    transport,
    sessions: createClient(SessionService, transport),
    media: createClient(MediaService, transport),
    interaction: createClient(InteractionService, transport),
    breakouts: createClient(BreakoutService, transport),
    recordings: createClient(RecordingService, transport),
    admin: createClient(AdminService, transport),
    setToken(next: TokenSource): void {
      token = next;
    },
  };
}
