/**
 * `@classmesh/web`: ClassMesh for browsers, through the ClassMesh grpc-web gateway.
 *
 *     import { createClassMeshClient, watchSession } from "@classmesh/web";
 *     const cm = createClassMeshClient({ baseUrl: location.origin, token });
 *     const { participant } = await cm.sessions.joinSession({ sessionId });
 *     for await (const event of watchSession(cm, sessionId)) { ... }
 */
export {
  bearerAuth,
  createClassMeshClient,
  randomId,
  requestIds,
  type ClassMeshClient,
  type ClassMeshClientOptions,
  type TokenSource,
} from "./client.js";
export {
  ClassMeshError,
  ERROR_DOMAIN,
  errorDetails,
  type ErrorDetails,
  type FieldViolation,
} from "./errors.js";
export {
  MediaSession,
  type ClientSignalMessage,
  type MediaSessionEvents,
  type MediaSessionOptions,
  type RemoteTrack,
} from "./media.js";
export {
  isTransient,
  receiveSignals,
  resumable,
  subscribeInteraction,
  watchSession,
  type ResumeOptions,
} from "./streams.js";
export * as pb from "./pb.js";
export { Code, ConnectError } from "@connectrpc/connect";
