// Connect-ES (the browser SDK's transport) against the ClassMesh grpc-web gateway.
//
// Run by tests/e2e/test_gateway.py, which starts `classmesh up` and passes:
//   CLASSMESH_GATEWAY_URL    the gateway's base URL
//   CLASSMESH_ADMIN_TOKEN    an admin token of the mesh's tenant
//   CLASSMESH_STUDENT_TOKEN  a student token (joins the session live)
//   CLASSMESH_SESSION_ID     a LIVE class
//   CLASSMESH_TENANT_ID      the tenant's id
// Alone: `make test-gateway-node` (through pytest, which provides all of that).
import { test } from "node:test";
import assert from "node:assert/strict";
import { create, createFileRegistry } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { AdminService } from "../../gen/ts/classmesh/admin/v1/admin_service_pb.js";
import { SessionService } from "../../gen/ts/classmesh/session/v1/session_service_pb.js";

const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `${name} must be set (tests/e2e/test_gateway.py sets it)`);
  return value;
};
const baseUrl = env("CLASSMESH_GATEWAY_URL");
const adminToken = env("CLASSMESH_ADMIN_TOKEN");
const studentToken = env("CLASSMESH_STUDENT_TOKEN");
const sessionId = env("CLASSMESH_SESSION_ID");
const tenantId = env("CLASSMESH_TENANT_ID");

const bearer = (token) => ({ authorization: `Bearer ${token}` });
const binary = createGrpcWebTransport({ baseUrl, useBinaryFormat: true });

// google.rpc.ErrorInfo, described at run time (gen/ts has ClassMesh's protos only), so
// ConnectError.findDetails decodes the gateway's grpc-status-details-bin like a browser would.
const errorDetails = createFileRegistry(
  create(FileDescriptorProtoSchema, {
    name: "google/rpc/error_details.proto",
    package: "google.rpc",
    syntax: "proto3",
    messageType: [
      {
        name: "ErrorInfo",
        field: [
          { name: "reason", number: 1, label: 1, type: 9, jsonName: "reason" },
          { name: "domain", number: 2, label: 1, type: 9, jsonName: "domain" },
          {
            name: "metadata",
            number: 3,
            label: 3,
            type: 11,
            typeName: ".google.rpc.ErrorInfo.MetadataEntry",
            jsonName: "metadata",
          },
        ],
        nestedType: [
          {
            name: "MetadataEntry",
            field: [
              { name: "key", number: 1, label: 1, type: 9, jsonName: "key" },
              { name: "value", number: 2, label: 1, type: 9, jsonName: "value" },
            ],
            options: { mapEntry: true },
          },
        ],
      },
    ],
  }),
  () => undefined,
);
const ErrorInfoSchema = errorDetails.getMessage("google.rpc.ErrorInfo");

async function rejects(promise) {
  try {
    await promise;
  } catch (err) {
    return ConnectError.from(err);
  }
  assert.fail("the call should have failed");
}

test("unary: AdminService.GetTenant returns the tenant", async () => {
  const admin = createClient(AdminService, binary);
  const res = await admin.getTenant({}, { headers: bearer(adminToken) });
  assert.equal(res.tenant?.id, tenantId);
});

test("server stream: WatchSession replays, then delivers a join live", async () => {
  const sessions = createClient(SessionService, binary);
  const abort = new AbortController();
  const seen = [];
  const studentClient = createClient(SessionService, binary);
  let joined = false;
  try {
    for await (const res of sessions.watchSession(
      { sessionId, afterSeq: 0n },
      { headers: bearer(adminToken), signal: abort.signal, timeoutMs: 20000 },
    )) {
      seen.push(res.event?.payload.case);
      if (res.event?.payload.case === "sessionStarted" && !joined) {
        joined = true;
        const join = await studentClient.joinSession(
          { requestId: crypto.randomUUID(), target: { case: "sessionId", value: sessionId } },
          { headers: bearer(studentToken) },
        );
        assert.ok(join.participant?.userId);
      }
      if (res.event?.payload.case === "participantJoined") {
        break;
      }
    }
  } finally {
    abort.abort();
  }
  assert.equal(seen[0], "sessionCreated");
  assert.ok(seen.includes("sessionStarted"), String(seen));
  assert.equal(seen.at(-1), "participantJoined");
});

test("error details: NOT_FOUND carries one ErrorInfo (findDetails)", async () => {
  const sessions = createClient(SessionService, binary);
  const missing = crypto.randomUUID();
  const err = await rejects(sessions.getSession({ sessionId: missing }, { headers: bearer(adminToken) }));
  assert.equal(err.code, Code.NotFound);
  assert.match(err.rawMessage, new RegExp(missing));
  const infos = err.findDetails(ErrorInfoSchema);
  assert.equal(infos.length, 1);
  assert.equal(infos[0].reason, "NOT_FOUND");
  assert.equal(infos[0].domain, "classmesh.dev");
  assert.equal(infos[0].metadata.resourceId, missing);
});

test("error details: bidi InteractionService.Connect answers UNIMPLEMENTED naming its twin", async () => {
  // Connect-ES refuses client/bidi streams over fetch before sending anything; a client
  // that sends one anyway gets a trailers-only UNIMPLEMENTED that names the twin.
  const res = await fetch(`${baseUrl}/classmesh.interaction.v1.InteractionService/Connect`, {
    method: "POST",
    headers: { "content-type": "application/grpc-web+proto", ...bearer(adminToken) },
    body: new Uint8Array([0, 0, 0, 0, 0]),
  });
  assert.equal(res.status, 200);
  assert.equal(res.headers.get("grpc-status"), String(Code.Unimplemented));
  assert.match(decodeURIComponent(res.headers.get("grpc-message")), /InteractionService\.Subscribe/);
});

test("deadline: timeoutMs on a live stream ends it with DEADLINE_EXCEEDED", async () => {
  const sessions = createClient(SessionService, binary);
  const started = Date.now();
  let received = 0;
  const err = await rejects(
    (async () => {
      for await (const _ of sessions.watchSession(
        { sessionId, afterSeq: 0n },
        { headers: bearer(adminToken), timeoutMs: 800 },
      )) {
        received += 1;
      }
    })(),
  );
  assert.equal(err.code, Code.DeadlineExceeded);
  assert.ok(received > 0, "the replay arrives before the deadline");
  assert.ok(Date.now() - started < 10000);
});

test("metadata: request headers reach the server, trailers come back", async () => {
  const admin = createClient(AdminService, binary);
  const correlationId = `node-${crypto.randomUUID()}`;
  let header;
  let trailer;
  await admin.getTenant(
    {},
    {
      headers: { ...bearer(adminToken), "x-correlation-id": correlationId },
      onHeader: (h) => (header = h),
      onTrailer: (t) => (trailer = t),
    },
  );
  assert.ok(header instanceof Headers);
  assert.equal(trailer.get("x-correlation-id"), correlationId);
  // On an error the status and trailing metadata arrive together (trailers-only).
  const err = await rejects(admin.getTenant({}, { headers: { "x-correlation-id": correlationId } }));
  assert.equal(err.code, Code.Unauthenticated);
  assert.equal(err.metadata.get("x-correlation-id"), correlationId);
});

// grpc-web-text: Connect-ES has no text mode of its own (its `useBinaryFormat: false` is
// JSON, which the gateway refuses: it forwards bytes and never transcodes). Browsers that
// need text mode (the official grpc-web client's `grpcwebtext`) base64 the body and read a
// base64 stream back; this fetch does exactly that under Connect-ES.
function decodeBase64Stream() {
  let pending = "";
  return new TransformStream({
    transform(chunk, controller) {
      pending += new TextDecoder().decode(chunk);
      const usable = pending.length - (pending.length % 4);
      let start = 0;
      for (let i = 0; i < usable; i += 4) {
        if (pending.slice(i, i + 4).includes("=")) {
          controller.enqueue(Buffer.from(pending.slice(start, i + 4), "base64"));
          start = i + 4;
        }
      }
      if (usable > start) {
        controller.enqueue(Buffer.from(pending.slice(start, usable), "base64"));
      }
      pending = pending.slice(usable);
    },
  });
}

async function grpcWebTextFetch(input, init) {
  const headers = new Headers(init.headers);
  headers.set("content-type", "application/grpc-web-text");
  headers.set("accept", "application/grpc-web-text");
  const body = Buffer.from(init.body).toString("base64");
  const res = await fetch(input, { ...init, headers, body });
  assert.match(res.headers.get("content-type") ?? "", /^application\/grpc-web-text/);
  const out = new Headers(res.headers);
  out.set("content-type", "application/grpc-web+proto");
  return new Response(res.body?.pipeThrough(decodeBase64Stream()) ?? null, {
    status: res.status,
    headers: out,
  });
}

test("text mode: unary and server stream over application/grpc-web-text", async () => {
  const text = createGrpcWebTransport({ baseUrl, useBinaryFormat: true, fetch: grpcWebTextFetch });
  const admin = createClient(AdminService, text);
  const res = await admin.getTenant({}, { headers: bearer(adminToken) });
  assert.equal(res.tenant?.id, tenantId);
  const sessions = createClient(SessionService, text);
  const kinds = [];
  const err = await rejects(
    (async () => {
      for await (const r of sessions.watchSession(
        { sessionId, afterSeq: 0n },
        { headers: bearer(adminToken), timeoutMs: 1500 },
      )) {
        kinds.push(r.event?.payload.case);
      }
    })(),
  );
  assert.equal(err.code, Code.DeadlineExceeded);
  assert.deepEqual(kinds.slice(0, 2), ["sessionCreated", "sessionStarted"]);
  const missing = await rejects(
    sessions.getSession({ sessionId: crypto.randomUUID() }, { headers: bearer(adminToken) }),
  );
  assert.equal(missing.code, Code.NotFound);
  assert.equal(missing.findDetails(ErrorInfoSchema)[0]?.reason, "NOT_FOUND");
});

test("text mode: JSON (useBinaryFormat: false) is refused cleanly", async () => {
  const json = createGrpcWebTransport({ baseUrl, useBinaryFormat: false });
  const admin = createClient(AdminService, json);
  const err = await rejects(admin.getTenant({}, { headers: bearer(adminToken) }));
  assert.match(err.rawMessage, /JSON is not supported/);
});
