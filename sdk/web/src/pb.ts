/**
 * The generated messages, enums and service descriptors (protoc-gen-es v2, `gen/ts`), one
 * namespace per proto file: `pb.session.ParticipantStatus.LOBBY`,
 * `create(pb.interaction.PollSchema, {...})`, `pb.events.Event`.
 */
export * as admin from "../../../gen/ts/classmesh/admin/v1/admin_pb.js";
export * as adminService from "../../../gen/ts/classmesh/admin/v1/admin_service_pb.js";
export * as breakout from "../../../gen/ts/classmesh/breakout/v1/breakout_pb.js";
export * as breakoutService from "../../../gen/ts/classmesh/breakout/v1/breakout_service_pb.js";
export * as common from "../../../gen/ts/classmesh/common/v1/common_pb.js";
export * as events from "../../../gen/ts/classmesh/events/v1/events_pb.js";
export * as interaction from "../../../gen/ts/classmesh/interaction/v1/interaction_pb.js";
export * as interactionService from "../../../gen/ts/classmesh/interaction/v1/interaction_service_pb.js";
export * as media from "../../../gen/ts/classmesh/media/v1/media_pb.js";
export * as mediaService from "../../../gen/ts/classmesh/media/v1/media_service_pb.js";
export * as recording from "../../../gen/ts/classmesh/recording/v1/recording_pb.js";
export * as recordingService from "../../../gen/ts/classmesh/recording/v1/recording_service_pb.js";
export * as session from "../../../gen/ts/classmesh/session/v1/session_pb.js";
export * as sessionService from "../../../gen/ts/classmesh/session/v1/session_service_pb.js";
