/**
 * Live feeds that survive reconnects. Every ClassMesh feed is a server stream that takes
 * `after_seq`, replays what the caller missed, then goes live; `resumable` re-opens a feed
 * after a transient failure with the last `seq` it delivered, so the caller sees every item
 * once, in order, without gaps.
 */
import { Code } from "@connectrpc/connect";
import type { Event } from "../../../gen/ts/classmesh/events/v1/events_pb.js";
import type { ServerSignal } from "../../../gen/ts/classmesh/media/v1/media_pb.js";
import type { ClassMeshClient } from "./client.js";
import { ClassMeshError } from "./errors.js";

export interface ResumeOptions {
  /** Start after this seq (0 = from the beginning of what the feed keeps). */
  afterSeq?: bigint;
  /** Stops the feed (the generator returns). */
  signal?: AbortSignal;
  /** Which failures re-open the feed; default: transient ones (see `isTransient`). */
  retryable?: (err: ClassMeshError) => boolean;
  /** Consecutive failed attempts (no item in between) before the error is thrown; default 8. */
  maxAttempts?: number;
  /** First back-off delay in ms (doubles per attempt, capped by `maxDelayMs`); default 250. */
  minDelayMs?: number;
  /** Largest back-off delay in ms; default 5000. */
  maxDelayMs?: number;
  /** Told about every re-open (for logs and UI). */
  onRetry?: (err: ClassMeshError, attempt: number, afterSeq: bigint) => void;
}

/** Failures a read-only feed may be re-opened after. */
export function isTransient(err: ClassMeshError): boolean {
  return [
    Code.Unavailable,
    Code.Unknown,
    Code.Internal,
    Code.Aborted,
    Code.ResourceExhausted,
    Code.DeadlineExceeded,
  ].includes(err.code);
}

/**
 * Yields the items of `open(afterSeq)`, re-opening it after transient failures with the seq
 * of the last item delivered (items at or below it are skipped, so a replay overlap is never
 * delivered twice). Ends when the stream ends normally or `signal` aborts.
 */
export async function* resumable<T>(
  open: (afterSeq: bigint, signal: AbortSignal) => AsyncIterable<T>,
  seqOf: (item: T) => bigint,
  options: ResumeOptions = {},
): AsyncGenerator<T, void, undefined> {
  const retryable = options.retryable ?? isTransient;
  const maxAttempts = options.maxAttempts ?? 8;
  const minDelay = options.minDelayMs ?? 250;
  const maxDelay = options.maxDelayMs ?? 5000;
  let after = options.afterSeq ?? 0n;
  let failures = 0;
  for (;;) {
    const controller = new AbortController();
    const stop = (): void => controller.abort();
    options.signal?.addEventListener("abort", stop, { once: true });
    try {
      for await (const item of open(after, controller.signal)) {
        const seq = seqOf(item);
        if (seq > 0n && seq <= after) {
          continue;
        }
        if (seq > 0n) {
          after = seq;
        }
        failures = 0;
        yield item;
      }
      return;
    } catch (e) {
      if (options.signal?.aborted) {
        return;
      }
      const err = ClassMeshError.from(e);
      failures += 1;
      if (!retryable(err) || failures >= maxAttempts) {
        throw err;
      }
      options.onRetry?.(err, failures, after);
      const backoff = Math.min(maxDelay, minDelay * 2 ** (failures - 1));
      await sleep(err.retryAfterMs ?? backoff, options.signal);
      if (options.signal?.aborted) {
        return;
      }
    } finally {
      options.signal?.removeEventListener("abort", stop);
      controller.abort();
    }
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done(): void {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done, { once: true });
  });
}

/** `SessionService.WatchSession`, resumed by `seq`: the session's whole event log, live. */
export function watchSession(
  client: ClassMeshClient,
  sessionId: string,
  options: ResumeOptions = {},
): AsyncGenerator<Event, void, undefined> {
  return resumable(
    (afterSeq, signal) =>
      mapStream(client.sessions.watchSession({ sessionId, afterSeq }, { signal }), (r) => r.event),
    (e) => e.seq,
    options,
  );
}

/** `InteractionService.Subscribe`, resumed by `seq`: one scope's interaction feed, live. */
export function subscribeInteraction(
  client: ClassMeshClient,
  scope: { sessionId: string; breakoutRoomId?: string },
  options: ResumeOptions & { includeSessionEvents?: boolean } = {},
): AsyncGenerator<Event, void, undefined> {
  return resumable(
    (afterSeq, signal) =>
      mapStream(
        client.interaction.subscribe(
          {
            scope: { sessionId: scope.sessionId, breakoutRoomId: scope.breakoutRoomId ?? "" },
            afterSeq,
            includeSessionEvents: options.includeSessionEvents ?? false,
          },
          { signal },
        ),
        (r) => r.event,
      ),
    (e) => e.seq,
    options,
  );
}

/** `MediaService.ReceiveSignals`, resumed by `seq`: server -> client media signals. */
export function receiveSignals(
  client: ClassMeshClient,
  room: { sessionId: string; breakoutRoomId?: string },
  options: ResumeOptions = {},
): AsyncGenerator<ServerSignal, void, undefined> {
  return resumable(
    (afterSeq, signal) =>
      mapStream(
        client.media.receiveSignals(
          { sessionId: room.sessionId, breakoutRoomId: room.breakoutRoomId ?? "", afterSeq },
          { signal },
        ),
        (r) => r.signal,
      ),
    (s) => s.seq,
    options,
  );
}

async function* mapStream<R, T>(
  stream: AsyncIterable<R>,
  pick: (r: R) => T | undefined,
): AsyncGenerator<T, void, undefined> {
  for await (const r of stream) {
    const item = pick(r);
    if (item !== undefined) {
      yield item;
    }
  }
}
