// @classmesh/web (the built package, sdk/web/dist) against the real gateway and mesh, in
// Node: the facade's typed clients, bearer auth, request ids, decoded error details and the
// resumable feeds. The browser-only part (MediaSession) runs in tests/e2e/test_browser.py.
//
// Run by tests/e2e/test_browser.py (test_web_sdk_in_node), which starts `classmesh up`,
// builds sdk/web and passes:
//   CLASSMESH_GATEWAY_URL    the gateway's base URL
//   CLASSMESH_TEACHER_TOKEN  the instructor of CLASSMESH_SESSION_ID (joined)
//   CLASSMESH_STUDENT_TOKEN  a student token (not joined yet; the lobby is off)
//   CLASSMESH_SESSION_ID     a LIVE class
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  ClassMeshError,
  Code,
  createClassMeshClient,
  pb,
  resumable,
  subscribeInteraction,
  watchSession,
} from "../dist/index.js";

const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `${name} must be set (tests/e2e/test_browser.py sets it)`);
  return value;
};
const baseUrl = env("CLASSMESH_GATEWAY_URL");
const teacherToken = env("CLASSMESH_TEACHER_TOKEN");
const studentToken = env("CLASSMESH_STUDENT_TOKEN");
const sessionId = env("CLASSMESH_SESSION_ID");
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const TEXT = pb.interaction.ChatMessageType.TEXT;

async function rejects(promise) {
  try {
    await promise;
  } catch (err) {
    return ClassMeshError.from(err);
  }
  assert.fail("the call should have failed");
}

/** Records the request_id of every unary call, as the server receives it. */
function recorder() {
  const seen = [];
  const interceptor = (next) => async (req) => {
    if (!req.stream && "requestId" in req.message) {
      seen.push([req.method.name, req.message.requestId]);
    }
    return next(req);
  };
  return { seen, interceptor };
}

test("typed clients with the bearer token; the student joins", async () => {
  const student = createClassMeshClient({ baseUrl, token: studentToken });
  const join = await student.sessions.joinSession({
    target: { case: "sessionId", value: sessionId },
  });
  assert.equal(join.participant?.status, pb.session.ParticipantStatus.ADMITTED);
  assert.equal(join.session?.id, sessionId);
  const got = await student.sessions.getSession({ sessionId });
  assert.equal(got.session?.status, pb.session.SessionStatus.LIVE);
});

test("no token: UNAUTHENTICATED with ClassMesh's ErrorInfo decoded", async () => {
  const anonymous = createClassMeshClient({ baseUrl });
  const err = await rejects(anonymous.sessions.getSession({ sessionId }));
  assert.equal(err.code, Code.Unauthenticated);
  assert.equal(err.codeName, "Unauthenticated");
  assert.equal(err.domain, "classmesh.dev");
  assert.ok(err.reason.length > 0, "an ErrorInfo reason");
});

test("a token source function is asked on every call; setToken swaps it", async () => {
  let asked = 0;
  const client = createClassMeshClient({
    baseUrl,
    token: async () => {
      asked += 1;
      return teacherToken;
    },
  });
  await client.sessions.getSession({ sessionId });
  await client.sessions.getSession({ sessionId });
  assert.equal(asked, 2);
  client.setToken(undefined);
  const err = await rejects(client.sessions.getSession({ sessionId }));
  assert.equal(err.code, Code.Unauthenticated);
});

test("request ids: filled when empty (fresh UUIDs), kept when given (idempotent repeat)", async () => {
  const { seen, interceptor } = recorder();
  const teacher = createClassMeshClient({ baseUrl, token: teacherToken, interceptors: [interceptor] });
  const scope = { sessionId };
  const a = await teacher.interaction.sendChatMessage({ scope, text: "first", type: TEXT });
  const b = await teacher.interaction.sendChatMessage({ scope, text: "first", type: TEXT });
  assert.notEqual(a.message?.id, b.message?.id, "two calls, two messages");
  const ids = seen.map(([, id]) => id);
  assert.equal(ids.length, 2);
  for (const id of ids) {
    assert.match(id, UUID);
  }
  assert.notEqual(ids[0], ids[1]);
  // The caller's own id is kept: a retry with it returns the first response.
  const requestId = `retry-${Date.now()}`;
  const first = await teacher.interaction.sendChatMessage({ requestId, scope, text: "once", type: TEXT });
  const again = await teacher.interaction.sendChatMessage({ requestId, scope, text: "once", type: TEXT });
  assert.equal(again.message?.id, first.message?.id);
  assert.equal(seen.at(-1)[1], requestId);
  // Read-only calls have no request_id: nothing recorded for them.
  await teacher.sessions.getSession({ sessionId });
  assert.equal(seen.length, 4);
});

test("INVALID_ARGUMENT carries BadRequest field violations", async () => {
  const teacher = createClassMeshClient({ baseUrl, token: teacherToken });
  const err = await rejects(
    teacher.interaction.sendChatMessage({ scope: { sessionId }, text: "   ", type: TEXT }),
  );
  assert.equal(err.code, Code.InvalidArgument);
  assert.equal(err.domain, "classmesh.dev");
  assert.ok(
    err.fieldViolations.some((v) => v.field.endsWith("text") && v.description.length > 0),
    JSON.stringify(err.fieldViolations),
  );
});

test("watchSession replays the log in seq order", async () => {
  const teacher = createClassMeshClient({ baseUrl, token: teacherToken });
  const abort = new AbortController();
  const kinds = [];
  let last = 0n;
  for await (const event of watchSession(teacher, sessionId, { signal: abort.signal })) {
    assert.ok(event.seq > last, "seq strictly increasing");
    last = event.seq;
    kinds.push(event.payload.case);
    if (kinds.filter((k) => k === "participantJoined").length === 2) {
      abort.abort();
    }
  }
  assert.deepEqual(kinds.slice(0, 2), ["sessionCreated", "sessionStarted"]);
});

test("a feed cut mid-stream resumes after the last seq: every message once, in order", async () => {
  const teacher = createClassMeshClient({ baseUrl, token: teacherToken });
  const scope = { sessionId };
  const before = [];
  for (let i = 0; i < 3; i++) {
    before.push((await teacher.interaction.sendChatMessage({ scope, text: `before ${i}`, type: TEXT })).message);
  }
  // The first Subscribe response dies after its first body chunk, as a dropped connection
  // does; later ones pass through.
  let subscribes = 0;
  const cutting = async (input, init) => {
    const response = await fetch(input, init);
    const url = typeof input === "string" ? input : input.url;
    if (!url.endsWith("/Subscribe") || ++subscribes > 1) {
      return response;
    }
    const reader = response.body.getReader();
    let chunks = 0;
    const body = new ReadableStream({
      async pull(controller) {
        if (chunks++ >= 1) {
          controller.error(new TypeError("network connection lost"));
          await reader.cancel().catch(() => undefined);
          return;
        }
        const { done, value } = await reader.read();
        if (done) {
          controller.close();
        } else {
          controller.enqueue(value);
        }
      },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
  const reader = createClassMeshClient({ baseUrl, token: teacherToken, fetch: cutting });
  const retries = [];
  const abort = new AbortController();
  const got = [];
  const want = ["before 0", "before 1", "before 2", "after 0", "after 1"];
  // Two more messages are posted once the feed was cut: they arrive on the re-opened one.
  let sending;
  const feed = subscribeInteraction(reader, scope, {
    signal: abort.signal,
    minDelayMs: 50,
    onRetry: (err, attempt, afterSeq) => {
      retries.push({ code: err.code, attempt, afterSeq });
      sending ??= (async () => {
        for (let i = 0; i < 2; i++) {
          await teacher.interaction.sendChatMessage({ scope, text: `after ${i}`, type: TEXT });
        }
      })();
    },
  });
  const timer = setTimeout(() => abort.abort(), 20000);
  try {
    for await (const event of feed) {
      if (event.payload.case === "chatMessagePosted") {
        got.push([event.seq, event.payload.value.message?.text]);
      }
      if (want.every((t) => got.some(([, text]) => text === t))) {
        break;
      }
    }
  } finally {
    clearTimeout(timer);
    abort.abort();
  }
  await sending;
  assert.ok(retries.length >= 1, "the cut feed was re-opened");
  assert.ok(subscribes >= 2, "a second Subscribe call");
  const seqs = got.map(([seq]) => seq);
  assert.deepEqual(seqs, [...new Set(seqs)].sort((x, y) => (x < y ? -1 : 1)), "no duplicates, in order");
  for (const text of want) {
    assert.ok(got.some(([, t]) => t === text), `${text} delivered (${JSON.stringify(got.map(([, t]) => t))})`);
  }
  assert.ok(before.every((m) => got.some(([seq]) => seq === m.seq)));
});

test("resumable gives up on a non-transient error and throws it", async () => {
  const student = createClassMeshClient({ baseUrl });
  let opens = 0;
  const feed = resumable(
    (afterSeq, signal) => {
      opens += 1;
      return student.sessions.watchSession({ sessionId, afterSeq }, { signal });
    },
    (r) => r.event?.seq ?? 0n,
  );
  const err = await rejects((async () => {
    for await (const _ of feed) {
      // nothing arrives: the call is refused
    }
  })());
  assert.equal(err.code, Code.Unauthenticated);
  assert.equal(opens, 1);
});
