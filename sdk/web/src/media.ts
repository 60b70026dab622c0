/**
 * `MediaSession`: a browser's WebRTC media in one ClassMesh room, signalled over grpc-web.
 *
 * Browsers cannot open the bidi `MediaService.Signal` stream through grpc-web, so this uses
 * its twin: unary `SendSignal` for client -> server signals (publish, offer, answer, ICE,
 * subscribe, leave) and the `ReceiveSignals` server stream for server -> client signals
 * (answers' echoes, server-initiated offers on the subscriber connection, ICE candidates,
 * track announcements, moves), resumed by `seq` after a reconnect.
 *
 * Two peer connections, LiveKit-style: `publisher` carries the tracks this browser sends
 * (the browser offers), `subscriber` carries the tracks it receives (the server offers after
 * every `subscribe`). ICE candidates trickle both ways; a connection's local candidates are
 * held back until the server has its description (offer applied / answer sent), and client
 * -> server signals are sent one at a time, in order.
 *
 *     const media = new MediaSession(client, { sessionId });
 *     await media.start();
 *     const cam = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
 *     await media.publish(cam);                              // our Track protos
 *     const [teacher] = await media.waitTracks(1);
 *     media.on("remote-track", ({ track }) => (video.srcObject = new MediaStream([track])));
 *     await media.subscribe([teacher.id]);
 */
import type { MessageInitShape } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import {
  type ClientSignalSchema,
  PeerConnectionTarget,
  type RouterMoved,
  SdpType,
  type ServerSignal,
  type Track,
  TrackKind,
  TrackSource,
} from "../../../gen/ts/classmesh/media/v1/media_pb.js";
import type { ClassMeshClient } from "./client.js";
import { randomId } from "./client.js";
import { ClassMeshError } from "./errors.js";
import { resumable } from "./streams.js";

/** The `message` oneof of a `ClientSignal`, e.g. `{ case: "subscribe", value: {...} }`. */
export type ClientSignalMessage = NonNullable<MessageInitShape<typeof ClientSignalSchema>["message"]>;

/** A track received on the subscriber connection. */
export interface RemoteTrack {
  track: MediaStreamTrack;
  streams: readonly MediaStream[];
  /** The transceiver's mid on the subscriber connection. */
  mid: string | null;
  /**
   * The ClassMesh track it carries: the oldest pending subscription of the same kind (the
   * server adds consumers in subscription order); undefined if none matches.
   */
  info: Track | undefined;
}

/** What a `MediaSession` tells its listeners. */
export interface MediaSessionEvents {
  /** Someone else published a track in the room. */
  "track-published": Track;
  /** A track was unpublished. */
  "track-unpublished": Track;
  /** A subscribed track arrived on the subscriber connection. */
  "remote-track": RemoteTrack;
  /** The server moved this participant's media to another room (breakout). */
  moved: RouterMoved;
  /** The room's router was re-created after a media worker failure (already renegotiated). */
  restarted: ServerSignal;
  /** A peer connection's state changed. */
  "connection-state": { target: "publisher" | "subscriber"; state: RTCPeerConnectionState };
  /** Every server signal, as received (after this session handled it). */
  signal: ServerSignal;
  /** The signal stream ended (leave, removal, session end); the error, if it failed. */
  closed: ClassMeshError | undefined;
}

export interface MediaSessionOptions {
  sessionId: string;
  /** Breakout room; empty = the main room. */
  breakoutRoomId?: string;
  /** RTCPeerConnection configuration (ICE servers); default: no ICE servers. */
  rtcConfiguration?: RTCConfiguration;
  /** Ask `GetTurnCredentials` for ICE servers on start (needs TURN configured). */
  useTurn?: boolean;
  /**
   * Close this user's previous media connection in the room before starting (default true):
   * the server keeps one per user, and its buffered signals belong to the old page.
   */
  fresh?: boolean;
  /** Deadline of each SendSignal in ms (default 15000). */
  signalTimeoutMs?: number;
}

type Listener<T> = (value: T) => void;
type Target = "publisher" | "subscriber";

const TARGET: Record<Target, PeerConnectionTarget> = {
  publisher: PeerConnectionTarget.PUBLISHER,
  subscriber: PeerConnectionTarget.SUBSCRIBER,
};

/** One participant's publisher + subscriber peer connections in one room. */
export class MediaSession {
  readonly client: ClassMeshClient;
  readonly sessionId: string;
  breakoutRoomId: string;
  publisher: RTCPeerConnection;
  subscriber: RTCPeerConnection;
  /** Tracks published by others in the room (id -> Track), as announced. */
  readonly tracks = new Map<string, Track>();
  /** Own published tracks (id -> Track). */
  readonly published = new Map<string, Track>();
  /** Every server signal received, in order. */
  readonly signals: ServerSignal[] = [];
  /** The error the signal stream ended with, if any. */
  error: ClassMeshError | undefined;
  /** Local ICE candidates the server accepted, and ones it refused or that were lost. */
  readonly candidates = {
    sent: { publisher: 0, subscriber: 0 },
    failed: { publisher: 0, subscriber: 0 },
  };
  closed = false;

  private readonly options: MediaSessionOptions;
  private readonly listeners = new Map<keyof MediaSessionEvents, Set<Listener<never>>>();
  private readonly prefix = randomId().slice(0, 8);
  private counter = 0;
  private sendChain: Promise<unknown> = Promise.resolve();
  private publishChain: Promise<unknown> = Promise.resolve();
  private readonly ready: Record<Target, boolean> = { publisher: false, subscriber: false };
  private readonly heldCandidates: Record<Target, (RTCIceCandidate | null)[]> = {
    publisher: [],
    subscriber: [],
  };
  private readonly pendingSubscriptions: string[] = [];
  /** Track ids subscribed to (asked for again after a media restart). */
  private readonly subscribed = new Set<string>();
  /** Local tracks published (offered again after a restart or a move that needs it). */
  private readonly local: { track: MediaStreamTrack; stream: MediaStream }[] = [];
  private readonly remoteQueue: RemoteTrack[] = [];
  private readonly abort = new AbortController();
  private reader: Promise<void> | undefined;
  private started = false;
  private rtcConfiguration: RTCConfiguration;

  constructor(client: ClassMeshClient, options: MediaSessionOptions) {
    this.client = client;
    this.options = options;
    this.sessionId = options.sessionId;
    this.breakoutRoomId = options.breakoutRoomId ?? "";
    this.rtcConfiguration = options.rtcConfiguration ?? { iceServers: [] };
    this.publisher = this.newPeerConnection("publisher");
    this.subscriber = this.newPeerConnection("subscriber");
  }

  // ------------------------------------------------------------------ events

  /** Listen to an event; returns a function that removes the listener. */
  on<K extends keyof MediaSessionEvents>(
    event: K,
    listener: Listener<MediaSessionEvents[K]>,
  ): () => void {
    let set = this.listeners.get(event);
    if (set === undefined) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(listener as Listener<never>);
    return () => set.delete(listener as Listener<never>);
  }

  private emit<K extends keyof MediaSessionEvents>(event: K, value: MediaSessionEvents[K]): void {
    for (const listener of this.listeners.get(event) ?? []) {
      try {
        (listener as Listener<MediaSessionEvents[K]>)(value);
      } catch (err) {
        console.error(`MediaSession ${event} listener failed`, err);
      }
    }
  }

  // ------------------------------------------------------------------ lifecycle

  /**
   * Attach to the room: (optionally) close this user's previous media connection, make sure
   * the server holds a peer for us, then read its signals (replayed from the start, so the
   * room's current tracks are announced first).
   */
  async start(): Promise<void> {
    if (this.started) {
      throw new Error("MediaSession.start() was already called");
    }
    this.started = true;
    if (this.options.useTurn) {
      const turn = await this.client.media.getTurnCredentials({});
      this.rtcConfiguration = {
        ...this.rtcConfiguration,
        iceServers: turn.iceServers.map((s) => ({
          urls: s.urls,
          username: s.username,
          credential: s.credential,
        })),
      };
      this.publisher.setConfiguration(this.rtcConfiguration);
      this.subscriber.setConfiguration(this.rtcConfiguration);
    }
    if (this.options.fresh ?? true) {
      await this.request({ case: "leave", value: { reason: "new media session" } });
    }
    // The first signal creates our peer, so the stream below attaches to it (not to a
    // second one created concurrently); an empty end-of-candidates changes nothing.
    await this.request({
      case: "iceCandidate",
      value: { endOfCandidates: true, target: PeerConnectionTarget.SUBSCRIBER },
    });
    this.reader = this.read();
  }

  private async read(): Promise<void> {
    let error: ClassMeshError | undefined;
    try {
      // The room is read at every (re-)open: after a move the server's peer, and so the
      // stream to resume, lives in the new room's router.
      const feed = resumable(
        (afterSeq, signal) =>
          this.client.media.receiveSignals(
            { sessionId: this.sessionId, breakoutRoomId: this.breakoutRoomId, afterSeq },
            { signal },
          ),
        (r) => r.signal?.seq ?? 0n,
        { signal: this.abort.signal },
      );
      for await (const { signal } of feed) {
        if (signal === undefined) {
          continue;
        }
        await this.onSignal(signal);
      }
    } catch (err) {
      error = ClassMeshError.from(err);
      this.error = error;
    } finally {
      this.closed = true;
      this.emit("closed", error);
    }
  }

  /** Leave the room and close both connections. */
  async close(): Promise<void> {
    if (!this.closed) {
      try {
        await this.request({ case: "leave", value: { reason: "bye" } }, 5000);
      } catch {
        // Leaving is best effort: the server also closes peers of departed participants.
      }
    }
    this.closed = true;
    this.abort.abort();
    await this.reader?.catch(() => undefined);
    this.publisher.close();
    this.subscriber.close();
  }

  // ------------------------------------------------------------------ signals out

  /**
   * Send one client signal (in order with every other) and return the server's direct reply;
   * an error reply is thrown as a `ClassMeshError`.
   */
  request(message: ClientSignalMessage, timeoutMs?: number): Promise<ServerSignal> {
    const run = this.sendChain.then(() => this.sendNow(message, timeoutMs));
    this.sendChain = run.catch(() => undefined);
    return run;
  }

  private async sendNow(message: ClientSignalMessage, timeoutMs?: number): Promise<ServerSignal> {
    this.counter += 1;
    const signalId = `${this.prefix}-${this.counter}`;
    const response = await this.client.media.sendSignal(
      {
        requestId: signalId,
        signal: {
          signalId,
          sessionId: this.sessionId,
          breakoutRoomId: this.breakoutRoomId,
          message,
        },
      },
      { timeoutMs: timeoutMs ?? this.options.signalTimeoutMs ?? 15000 },
    );
    const reply = response.reply;
    if (reply === undefined) {
      throw new ClassMeshError(Code.Unknown, "SendSignal returned no reply", {
        reason: "",
        domain: "",
        metadata: {},
        fieldViolations: [],
        retryAfterMs: undefined,
      });
    }
    if (reply.message.case === "error") {
      throw ClassMeshError.fromStatus(reply.message.value);
    }
    return reply;
  }

  // ------------------------------------------------------------------ signals in

  private async onSignal(signal: ServerSignal): Promise<void> {
    this.signals.push(signal);
    const m = signal.message;
    try {
      switch (m.case) {
        case "offer":
          if (!signal.signalId) {
            await this.answerOffer(m.value.sdp);
          }
          break;
        case "iceCandidate": {
          const pc = m.value.target === PeerConnectionTarget.SUBSCRIBER ? this.subscriber : this.publisher;
          if (m.value.candidate) {
            await pc.addIceCandidate({
              candidate: m.value.candidate,
              sdpMid: m.value.sdpMid || null,
              sdpMLineIndex: m.value.sdpMlineIndex,
              usernameFragment: m.value.usernameFragment || null,
            });
          }
          break;
        }
        case "trackPublished":
          if (m.value.id) {
            this.tracks.set(m.value.id, m.value);
            this.emit("track-published", m.value);
          }
          break;
        case "trackUnpublished":
          this.tracks.delete(m.value.id);
          this.subscribed.delete(m.value.id);
          this.emit("track-unpublished", m.value);
          break;
        case "routerMoved":
          await this.moved(m.value);
          break;
        case "mediaRestarted":
          await this.restarted();
          this.emit("restarted", signal);
          break;
        default:
          break;
      }
    } catch (err) {
      console.error("media signal failed", m.case, err);
    }
    this.emit("signal", signal);
  }

  private async answerOffer(sdp: string): Promise<void> {
    const pc = this.subscriber;
    await pc.setRemoteDescription({ type: "offer", sdp });
    const answer = await pc.createAnswer();
    await pc.setLocalDescription(answer);
    await this.request({
      case: "answer",
      value: {
        type: SdpType.ANSWER,
        sdp: pc.localDescription?.sdp ?? answer.sdp ?? "",
        target: PeerConnectionTarget.SUBSCRIBER,
      },
    });
    this.release("subscriber");
  }

  /**
   * The server moved us to another room: replace the subscriber connection and forget the
   * old room's tracks (the new room's are announced next); when the server could not keep
   * the publisher connection (`republish`), offer our tracks again on a new one.
   */
  private async moved(moved: RouterMoved): Promise<void> {
    this.breakoutRoomId = moved.breakoutRoomId;
    this.tracks.clear();
    this.pendingSubscriptions.length = 0;
    this.subscribed.clear();
    this.replace("subscriber");
    if (moved.republish) {
      await this.republish();
    }
    this.emit("moved", moved);
  }

  /**
   * The router lost its forwarding state and was re-created: new connections both ways, our
   * tracks offered again (same track ids) and our subscriptions asked for again.
   */
  private async restarted(): Promise<void> {
    this.replace("subscriber");
    await this.republish();
    const again = [...this.subscribed].filter((id) => this.tracks.has(id));
    this.subscribed.clear();
    if (again.length > 0) {
      await this.subscribe(again);
    }
  }

  private replace(target: Target): void {
    const old = this[target];
    this[target] = this.newPeerConnection(target);
    this.ready[target] = false;
    this.heldCandidates[target] = [];
    old.close();
  }

  private republish(): Promise<void> {
    const run = this.publishChain.then(async () => {
      this.replace("publisher");
      if (this.local.length === 0) {
        return;
      }
      for (const { track, stream } of this.local) {
        this.publisher.addTransceiver(track, { direction: "sendonly", streams: [stream] });
      }
      await this.negotiatePublisher();
    });
    this.publishChain = run.catch(() => undefined);
    return run;
  }

  // ------------------------------------------------------------------ ICE

  private newPeerConnection(target: Target): RTCPeerConnection {
    const pc = new RTCPeerConnection(this.rtcConfiguration);
    pc.addEventListener("icecandidate", (ev) => {
      if (pc !== this[target]) {
        return;
      }
      this.localCandidate(target, ev.candidate);
    });
    pc.addEventListener("connectionstatechange", () => {
      this.emit("connection-state", { target, state: pc.connectionState });
    });
    if (target === "subscriber") {
      pc.addEventListener("track", (ev) => this.onRemoteTrack(ev));
    }
    return pc;
  }

  private localCandidate(target: Target, candidate: RTCIceCandidate | null): void {
    if (!this.ready[target]) {
      this.heldCandidates[target].push(candidate);
      return;
    }
    void this.sendCandidate(target, candidate);
  }

  /** The server has this connection's description: send the candidates held back so far. */
  private release(target: Target): void {
    if (this.ready[target]) {
      return;
    }
    this.ready[target] = true;
    const held = this.heldCandidates[target];
    this.heldCandidates[target] = [];
    for (const candidate of held) {
      void this.sendCandidate(target, candidate);
    }
  }

  private async sendCandidate(target: Target, candidate: RTCIceCandidate | null): Promise<void> {
    if (this.closed) {
      return;
    }
    const real = candidate !== null && candidate.candidate !== "";
    try {
      await this.request({
        case: "iceCandidate",
        value:
          candidate === null || !candidate.candidate
            ? { endOfCandidates: true, target: TARGET[target] }
            : {
                candidate: candidate.candidate,
                sdpMid: candidate.sdpMid ?? "",
                sdpMlineIndex: candidate.sdpMLineIndex ?? 0,
                usernameFragment: candidate.usernameFragment ?? "",
                target: TARGET[target],
              },
      });
      if (real) {
        this.candidates.sent[target] += 1;
      }
    } catch (err) {
      this.candidates.failed[target] += 1;
      console.warn("ICE candidate not delivered", err);
    }
  }

  // ------------------------------------------------------------------ publish

  /**
   * Publish local tracks (a `MediaStream` from `getUserMedia`, or tracks): announces each,
   * adds it to the publisher connection, and negotiates (browser offer, server answer).
   * Returns the server's `Track` per local track, in order.
   */
  publish(
    media: MediaStream | MediaStreamTrack[],
    options: { names?: Record<string, string>; screen?: boolean } = {},
  ): Promise<Track[]> {
    const run = this.publishChain.then(() => this.publishNow(media, options));
    this.publishChain = run.catch(() => undefined);
    return run;
  }

  private requireStarted(): void {
    if (this.reader === undefined) {
      throw new Error("call MediaSession.start() first");
    }
  }

  private async publishNow(
    media: MediaStream | MediaStreamTrack[],
    options: { names?: Record<string, string>; screen?: boolean },
  ): Promise<Track[]> {
    this.requireStarted();
    const stream = media instanceof MediaStream ? media : new MediaStream(media);
    const tracks = media instanceof MediaStream ? media.getTracks() : media;
    const out: Track[] = [];
    for (const track of tracks) {
      const video = track.kind === "video";
      const source = options.screen
        ? video
          ? TrackSource.SCREEN_SHARE
          : TrackSource.SCREEN_SHARE_AUDIO
        : video
          ? TrackSource.CAMERA
          : TrackSource.MICROPHONE;
      const reply = await this.request({
        case: "publish",
        value: {
          clientTrackId: track.id,
          kind: video ? TrackKind.VIDEO : TrackKind.AUDIO,
          source,
          name: options.names?.[track.id] ?? track.label.slice(0, 100),
        },
      });
      if (reply.message.case !== "publishAccepted" || reply.message.value.track === undefined) {
        throw new Error(`publish of ${track.kind} was not accepted: ${reply.message.case}`);
      }
      const accepted = reply.message.value.track;
      this.published.set(accepted.id, accepted);
      out.push(accepted);
      this.publisher.addTransceiver(track, { direction: "sendonly", streams: [stream] });
      this.local.push({ track, stream });
    }
    await this.negotiatePublisher();
    return out;
  }

  private async negotiatePublisher(): Promise<void> {
    const pc = this.publisher;
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    const reply = await this.request({
      case: "offer",
      value: {
        type: SdpType.OFFER,
        sdp: pc.localDescription?.sdp ?? offer.sdp ?? "",
        target: PeerConnectionTarget.PUBLISHER,
      },
    });
    if (reply.message.case !== "answer") {
      throw new Error(`the publisher offer got ${reply.message.case}, not an answer`);
    }
    await pc.setRemoteDescription({ type: "answer", sdp: reply.message.value.sdp });
    this.release("publisher");
  }

  /** Stop publishing a track (by the id the server gave it). */
  async unpublish(trackId: string): Promise<void> {
    await this.request({ case: "unpublish", value: { trackId } });
    const track = this.published.get(trackId);
    this.published.delete(trackId);
    const at = this.local.findIndex((l) => l.track.id === track?.clientTrackId);
    if (at >= 0) {
      const [gone] = this.local.splice(at, 1);
      const sender = this.publisher.getSenders().find((s) => s.track === gone?.track);
      if (sender !== undefined) {
        this.publisher.removeTrack(sender);
      }
    }
  }

  // ------------------------------------------------------------------ subscribe

  /** Receive tracks; the server offers on the subscriber connection and this answers. */
  async subscribe(trackIds: string[], options: { audioOnly?: boolean } = {}): Promise<void> {
    this.requireStarted();
    const fresh = trackIds.filter((id) => !this.pendingSubscriptions.includes(id));
    this.pendingSubscriptions.push(...fresh);
    try {
      await this.request({
        case: "subscribe",
        value: { trackIds, audioOnly: options.audioOnly ?? false },
      });
      for (const id of trackIds) {
        this.subscribed.add(id);
      }
    } catch (err) {
      for (const id of fresh) {
        const at = this.pendingSubscriptions.indexOf(id);
        if (at >= 0) {
          this.pendingSubscriptions.splice(at, 1);
        }
      }
      throw err;
    }
  }

  /** Stop receiving tracks. */
  async unsubscribe(trackIds: string[]): Promise<void> {
    await this.request({ case: "unsubscribe", value: { trackIds } });
    for (const id of trackIds) {
      this.subscribed.delete(id);
    }
  }

  private onRemoteTrack(ev: RTCTrackEvent): void {
    const kind = ev.track.kind === "video" ? TrackKind.VIDEO : TrackKind.AUDIO;
    const at = this.pendingSubscriptions.findIndex((id) => this.tracks.get(id)?.kind === kind);
    let info: Track | undefined;
    if (at >= 0) {
      const [id] = this.pendingSubscriptions.splice(at, 1);
      info = id === undefined ? undefined : this.tracks.get(id);
    }
    const remote: RemoteTrack = {
      track: ev.track,
      streams: ev.streams,
      mid: ev.transceiver.mid,
      info,
    };
    this.remoteQueue.push(remote);
    this.emit("remote-track", remote);
  }

  // ------------------------------------------------------------------ waiting

  /** Resolves once at least `count` tracks of others are announced. */
  waitTracks(count: number, timeoutMs = 10000): Promise<Track[]> {
    return this.waitFor(
      "track-published",
      () => (this.tracks.size >= count ? [...this.tracks.values()] : undefined),
      timeoutMs,
      `${count} published tracks`,
    );
  }

  /** The next remote track (in arrival order), waiting up to `timeoutMs`. */
  nextRemoteTrack(timeoutMs = 10000): Promise<RemoteTrack> {
    return this.waitFor("remote-track", () => this.remoteQueue.shift(), timeoutMs, "a remote track");
  }

  private waitFor<K extends keyof MediaSessionEvents, T>(
    event: K,
    check: () => T | undefined,
    timeoutMs: number,
    what: string,
  ): Promise<T> {
    const now = check();
    if (now !== undefined) {
      return Promise.resolve(now);
    }
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        off();
        offClosed();
        reject(new Error(`no ${what} within ${timeoutMs} ms`));
      }, timeoutMs);
      const off = this.on(event, () => {
        const value = check();
        if (value !== undefined) {
          clearTimeout(timer);
          off();
          offClosed();
          resolve(value);
        }
      });
      const offClosed = this.on("closed", (err) => {
        clearTimeout(timer);
        off();
        offClosed();
        reject(err ?? new Error(`media session closed before ${what}`));
      });
    });
  }
}
