/**
 * ClassMesh errors as the browser sees them: a Connect `ConnectError` (or a `RpcStatus`
 * carried inside a stream message, such as a failed media signal) plus the server's
 * `google.rpc` details, decoded: exactly one `ErrorInfo` (domain `classmesh.dev`, reason such
 * as `SESSION_FULL`), `BadRequest` field violations and `RetryInfo`.
 *
 * The `google.rpc` detail messages are tiny and stable, so they are read here with the
 * protobuf wire reader instead of shipping generated code for them.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import type { RpcStatus } from "../../../gen/ts/classmesh/common/v1/common_pb.js";

/** The domain of every ClassMesh `ErrorInfo`. */
export const ERROR_DOMAIN = "classmesh.dev";

/** One `google.rpc.BadRequest.FieldViolation`. */
export interface FieldViolation {
  field: string;
  description: string;
}

/** What a failed ClassMesh call says, decoded from its `google.rpc.Status` details. */
export interface ErrorDetails {
  /** `ErrorInfo.reason`, e.g. `"SESSION_FULL"`; empty when the server sent none. */
  reason: string;
  /** `ErrorInfo.domain` (`"classmesh.dev"` for ClassMesh's own errors). */
  domain: string;
  /** `ErrorInfo.metadata`. */
  metadata: Record<string, string>;
  /** `BadRequest.field_violations`. */
  fieldViolations: FieldViolation[];
  /** `RetryInfo.retry_delay` in milliseconds, when the server said when to retry. */
  retryAfterMs: number | undefined;
}

/** A failed call: the gRPC code and message plus the decoded details. */
export class ClassMeshError extends Error implements ErrorDetails {
  readonly code: Code;
  readonly reason: string;
  readonly domain: string;
  readonly metadata: Record<string, string>;
  readonly fieldViolations: FieldViolation[];
  readonly retryAfterMs: number | undefined;

  /** `cause`: the Connect error (or other failure) this was built from, when there was one. */
  constructor(code: Code, message: string, details: ErrorDetails, cause?: unknown) {
    super(`${Code[code] ?? code}: ${message}${details.reason ? ` [${details.reason}]` : ""}`, {
      cause,
    });
    this.name = "ClassMeshError";
    this.code = code;
    this.reason = details.reason;
    this.domain = details.domain;
    this.metadata = details.metadata;
    this.fieldViolations = details.fieldViolations;
    this.retryAfterMs = details.retryAfterMs;
  }

  /** The gRPC status name, e.g. `"FailedPrecondition"`. */
  get codeName(): string {
    return Code[this.code] ?? String(this.code);
  }

  /** A `ClassMeshError` from anything a call may throw (ConnectError, network error, ...). */
  static from(err: unknown): ClassMeshError {
    if (err instanceof ClassMeshError) {
      return err;
    }
    const ce = ConnectError.from(err);
    const details = emptyDetails();
    for (const d of ce.details) {
      if ("type" in d && d.value instanceof Uint8Array) {
        applyDetail(details, d.type, d.value);
      }
    }
    return new ClassMeshError(ce.code, ce.rawMessage, details, err);
  }

  /** A `ClassMeshError` from a `RpcStatus` carried in a stream message (e.g. a signal error). */
  static fromStatus(status: RpcStatus): ClassMeshError {
    const details = emptyDetails();
    for (const any of status.details) {
      applyDetail(details, any.typeUrl.slice(any.typeUrl.lastIndexOf("/") + 1), any.value);
    }
    const code = status.code in Code ? (status.code as Code) : Code.Unknown;
    return new ClassMeshError(code, status.message, details);
  }
}

/** The decoded `google.rpc` details of a failed call. */
export function errorDetails(err: unknown): ErrorDetails {
  const e = ClassMeshError.from(err);
  return {
    reason: e.reason,
    domain: e.domain,
    metadata: e.metadata,
    fieldViolations: e.fieldViolations,
    retryAfterMs: e.retryAfterMs,
  };
}

function emptyDetails(): ErrorDetails {
  return { reason: "", domain: "", metadata: {}, fieldViolations: [], retryAfterMs: undefined };
}

function applyDetail(out: ErrorDetails, typeName: string, value: Uint8Array): void {
  try {
    if (typeName === "google.rpc.ErrorInfo") {
      const info = readErrorInfo(value);
      out.reason = info.reason;
      out.domain = info.domain;
      out.metadata = info.metadata;
    } else if (typeName === "google.rpc.BadRequest") {
      out.fieldViolations.push(...readBadRequest(value));
    } else if (typeName === "google.rpc.RetryInfo") {
      out.retryAfterMs = readRetryInfo(value);
    }
  } catch {
    // A detail that does not parse is ignored: the code and message still stand.
  }
}

type Visit = (field: number, wire: WireType, r: BinaryReader) => boolean;

/** Reads every field of one message; `visit` returns true when it consumed the value. */
function readMessage(bytes: Uint8Array, visit: Visit): void {
  const r = new BinaryReader(bytes);
  while (r.pos < r.len) {
    const [field, wire] = r.tag();
    if (!visit(field, wire, r)) {
      r.skip(wire, field);
    }
  }
}

function readErrorInfo(bytes: Uint8Array): {
  reason: string;
  domain: string;
  metadata: Record<string, string>;
} {
  const info = { reason: "", domain: "", metadata: {} as Record<string, string> };
  readMessage(bytes, (field, wire, r) => {
    if (wire !== WireType.LengthDelimited) {
      return false;
    }
    if (field === 1) {
      info.reason = r.string();
    } else if (field === 2) {
      info.domain = r.string();
    } else if (field === 3) {
      let key = "";
      let val = "";
      readMessage(r.bytes(), (f, w, e) => {
        if (w !== WireType.LengthDelimited) {
          return false;
        }
        if (f === 1) {
          key = e.string();
        } else if (f === 2) {
          val = e.string();
        } else {
          return false;
        }
        return true;
      });
      info.metadata[key] = val;
    } else {
      return false;
    }
    return true;
  });
  return info;
}

function readBadRequest(bytes: Uint8Array): FieldViolation[] {
  const out: FieldViolation[] = [];
  readMessage(bytes, (field, wire, r) => {
    if (field !== 1 || wire !== WireType.LengthDelimited) {
      return false;
    }
    const v: FieldViolation = { field: "", description: "" };
    readMessage(r.bytes(), (f, w, e) => {
      if (w !== WireType.LengthDelimited || (f !== 1 && f !== 2)) {
        return false;
      }
      if (f === 1) {
        v.field = e.string();
      } else {
        v.description = e.string();
      }
      return true;
    });
    out.push(v);
    return true;
  });
  return out;
}

function readRetryInfo(bytes: Uint8Array): number | undefined {
  let ms: number | undefined;
  readMessage(bytes, (field, wire, r) => {
    if (field !== 1 || wire !== WireType.LengthDelimited) {
      return false;
    }
    let seconds = 0;
    let nanos = 0;
    readMessage(r.bytes(), (f, w, e) => {
      if (w !== WireType.Varint || (f !== 1 && f !== 2)) {
        return false;
      }
      if (f === 1) {
        seconds = Number(e.int64());
      } else {
        nanos = e.int32();
      }
      return true;
    });
    ms = seconds * 1000 + Math.round(nanos / 1e6);
    return true;
  });
  return ms;
}
