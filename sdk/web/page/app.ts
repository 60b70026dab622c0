/**
 * The ClassMesh classroom page (no framework): sign in with a token, join a session, wait in
 * the lobby, then roster, lobby admission (staff), chat, hand raise, polls and media, all
 * through `@classmesh/web` and the gateway that serves this page.
 *
 * Breakout rooms: the page follows the participant's room from the session feed
 * (`breakout_rooms_created`, `participant_assigned`, `participant_moved`,
 * `breakout_room_closed`, `breakout_rooms_closed`): the room's name, its chat, hand raises, polls and roster replace
 * the main room's, and the main room's come back when the room closes. Broadcasts from the
 * instructor show in a banner; staff see the open rooms with their participant counts.
 *
 * `?token=<JWT>&session=<id>` signs in and joins at once (links, tests); `&name=` sets the
 * display name. Guests: `?join=<join link token>&name=<display name>`, no token. Every element a test drives has an `id` and a `data-testid`.
 */
import {
  ClassMeshError,
  MediaSession,
  createClassMeshClient,
  pb,
  subscribeInteraction,
  watchSession,
  type ClassMeshClient,
  type RemoteTrack,
} from "../src/index.js";

type Participant = pb.session.Participant;
type Poll = pb.interaction.Poll;
type PollResults = pb.interaction.PollResults;
type BreakoutRoom = pb.breakout.BreakoutRoom;

const { ParticipantStatus } = pb.session;
const { Role } = pb.common;

/** Everything the page knows; `window.classmesh` exposes it for debugging. */
interface State {
  client: ClassMeshClient | undefined;
  sessionId: string;
  me: Participant | undefined;
  roster: Map<string, Participant>;
  hands: Map<string, boolean>;
  polls: Map<string, { poll: Poll; results: PollResults | undefined; mine: number[] }>;
  media: MediaSession | undefined;
  local: MediaStream | undefined;
  abort: AbortController;
  interactionStarted: boolean;
  /** The room the page shows: "" = the main room, else a breakout room id. */
  roomId: string;
  /** The interaction feed the page follows (its room and the controller that ends it). */
  feed: { roomId: string; abort: AbortController } | undefined;
  /** Seq of the session feed at join time: older room changes are already in `me`. */
  joinSeq: bigint;
  /** Names of every breakout room seen (open or closed). */
  roomNames: Map<string, string>;
  /** Whether we entered our breakout room (media moved), or were only assigned to it. */
  entered: boolean;
  /** Open breakout rooms (staff: from ListBreakoutRooms, with counts). */
  openRooms: Map<string, BreakoutRoom>;
  heartbeat: ReturnType<typeof setInterval> | undefined;
  iceServers: RTCIceServer[];
}

const state: State = {
  client: undefined,
  sessionId: "",
  me: undefined,
  roster: new Map(),
  hands: new Map(),
  polls: new Map(),
  media: undefined,
  local: undefined,
  abort: new AbortController(),
  interactionStarted: false,
  roomId: "",
  feed: undefined,
  joinSeq: 0n,
  roomNames: new Map(),
  entered: true,
  openRooms: new Map(),
  heartbeat: undefined,
  iceServers: [],
};
(globalThis as unknown as { classmesh: State }).classmesh = state;
/** The SDK's error decoding, for the console (and tests) next to `window.classmesh`. */
(globalThis as unknown as { classmeshErrors: typeof ClassMeshError }).classmeshErrors =
  ClassMeshError;

// ------------------------------------------------------------------------- DOM helpers

function $(id: string): HTMLElement {
  const el = document.getElementById(id);
  if (el === null) {
    throw new Error(`#${id} is missing from the page`);
  }
  return el;
}

function input(id: string): HTMLInputElement {
  return $(id) as HTMLInputElement;
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  text = "",
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    node.setAttribute(k, v);
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

function show(id: string, visible: boolean): void {
  $(id).hidden = !visible;
}

function setStatus(status: string, detail = ""): void {
  const s = $("status");
  s.dataset.status = status;
  s.textContent = detail ? `${status}: ${detail}` : status;
}

function showError(where: string, err: unknown): void {
  const e = ClassMeshError.from(err);
  const box = $("error");
  box.hidden = false;
  box.dataset.reason = e.reason;
  box.dataset.code = e.codeName;
  box.textContent = `${where}: ${e.message}`;
  console.error(where, e);
}

function roleName(role: pb.common.Role): string {
  return (Role[role] ?? "UNSPECIFIED").toLowerCase();
}

function isStaff(p: Participant | undefined): boolean {
  return (
    p !== undefined &&
    (p.role === Role.INSTRUCTOR || p.role === Role.ASSISTANT || p.role === Role.ADMIN)
  );
}

function statusName(s: pb.session.ParticipantStatus): string {
  return (ParticipantStatus[s] ?? "UNSPECIFIED").toLowerCase();
}

function scope(): { sessionId: string; breakoutRoomId: string } {
  return { sessionId: state.sessionId, breakoutRoomId: state.roomId };
}

function client(): ClassMeshClient {
  if (state.client === undefined) {
    throw new Error("not signed in");
  }
  return state.client;
}

// ------------------------------------------------------------------------- join

async function join(): Promise<void> {
  const token = input("token").value.trim();
  const sessionId = input("session-id").value.trim();
  const link = input("join-link").value.trim();
  const name = input("display-name").value.trim();
  $("error").hidden = true;
  if (!(token && sessionId) && !(link && name)) {
    showError(
      "join",
      new Error("a token and a session id are needed (or, for guests, a join link and a name)"),
    );
    return;
  }
  // Token holders join by session id; guests join with the link and no bearer token, and
  // use the session-scoped token the server hands them from then on.
  state.client = createClassMeshClient({ baseUrl: location.origin, token: token || undefined });
  setStatus("joining");
  try {
    const resp = await client().sessions.joinSession({
      target:
        token && sessionId
          ? { case: "sessionId", value: sessionId }
          : { case: "joinLinkToken", value: link },
      displayName: name,
    });
    if (resp.participant === undefined) {
      throw new Error("JoinSession returned no participant");
    }
    if (resp.accessToken) {
      client().setToken(resp.accessToken);
    }
    state.sessionId = resp.participant.sessionId || resp.session?.id || sessionId;
    state.me = resp.participant;
    state.joinSeq = resp.lastSeq;
    state.roomId = resp.participant.breakoutRoomId;
    renderRoom();
    state.iceServers = resp.iceServers.map((s) => ({
      urls: s.urls,
      ...(s.username ? { username: s.username } : {}),
      ...(s.credential ? { credential: s.credential } : {}),
    }));
    const me = $("me");
    me.dataset.userId = resp.participant.userId;
    me.dataset.role = roleName(resp.participant.role);
    me.textContent = `${resp.participant.displayName} (${roleName(resp.participant.role)})`;
    show("signin", false);
    $("session-title").textContent = resp.session?.title ?? sessionId;
    const beat = Number(resp.heartbeatInterval?.seconds ?? 10n) * 1000;
    state.heartbeat = setInterval(() => void heartbeat(), Math.max(beat, 1000));
    void watch();
    onMyStatus(resp.participant);
  } catch (err) {
    setStatus("error");
    showError("join", err);
  }
}

async function heartbeat(): Promise<void> {
  try {
    await client().sessions.heartbeat({ sessionId: state.sessionId });
  } catch (err) {
    console.warn("heartbeat failed", err);
  }
}

function onMyStatus(p: Participant): void {
  state.me = p;
  $("me").dataset.status = statusName(p.status);
  switch (p.status) {
    case ParticipantStatus.LOBBY:
      setStatus("lobby");
      show("lobby-wait", true);
      show("classroom", false);
      break;
    case ParticipantStatus.ADMITTED:
      setStatus("admitted");
      show("lobby-wait", false);
      show("classroom", true);
      show("lobby", isStaff(p));
      show("breakout-panel", isStaff(p));
      startInteraction();
      if (isStaff(p)) {
        refreshRooms();
      }
      break;
    case ParticipantStatus.REMOVED:
      setStatus("removed", p.removalReason);
      end();
      break;
    case ParticipantStatus.LEFT:
      setStatus("left");
      end();
      break;
    default:
      break;
  }
}

function end(): void {
  show("classroom", false);
  show("lobby-wait", false);
  state.abort.abort();
  if (state.heartbeat !== undefined) {
    clearInterval(state.heartbeat);
  }
  void state.media?.close();
}

// ------------------------------------------------------------------------- roster

/** The session's whole log from the start: the roster is rebuilt from its events. */
async function watch(): Promise<void> {
  try {
    for await (const event of watchSession(client(), state.sessionId, {
      signal: state.abort.signal,
    })) {
      const p = event.payload;
      switch (p.case) {
        case "participantJoined":
        case "participantAdmitted":
        case "participantRemoved":
        case "participantLeft":
        case "participantDisconnected":
        case "participantReconnected":
        case "participantMuted":
        case "participantUnmuted":
        case "permissionsChanged":
          if (p.value.participant !== undefined) {
            upsert(p.value.participant);
          }
          break;
        case "sessionEnded":
          setStatus("ended");
          end();
          break;
        case "breakoutRoomsCreated":
        case "participantAssigned":
        case "participantMoved":
        case "breakoutBroadcast":
        case "breakoutRoomsExtended":
        case "breakoutRoomClosed":
        case "breakoutRoomsClosed":
          onBreakout(event);
          break;
        default:
          break;
      }
    }
  } catch (err) {
    showError("session feed", err);
  }
}

function upsert(p: Participant): void {
  if (p.userId === state.me?.userId) {
    // Our own room is the page's (`state.roomId`), not the snapshot in an older event.
    p.breakoutRoomId = state.roomId;
  }
  state.roster.set(p.userId, p);
  if (p.userId === state.me?.userId && p.status !== state.me.status) {
    onMyStatus(p);
  }
  renderRoster();
}

function renderRoster(): void {
  const roster = $("roster");
  const lobby = $("lobby-list");
  roster.replaceChildren();
  lobby.replaceChildren();
  let lobbyCount = 0;
  for (const p of state.roster.values()) {
    const here = p.breakoutRoomId === state.roomId;
    if (
      here &&
      (p.status === ParticipantStatus.ADMITTED || p.status === ParticipantStatus.DISCONNECTED)
    ) {
      const hand = state.hands.get(p.userId) ?? false;
      const li = el(
        "li",
        {
          "data-testid": "roster-item",
          "data-user-id": p.userId,
          "data-role": roleName(p.role),
          "data-status": statusName(p.status),
          "data-hand": hand ? "raised" : "down",
          "data-room-id": p.breakoutRoomId,
        },
        `${p.displayName} · ${roleName(p.role)}${hand ? " · hand raised" : ""}`,
      );
      roster.append(li);
    } else if (p.status === ParticipantStatus.LOBBY) {
      lobbyCount += 1;
      const li = el("li", { "data-testid": "lobby-item", "data-user-id": p.userId });
      li.append(el("span", {}, `${p.displayName} `));
      if (isStaff(state.me)) {
        const btn = el(
          "button",
          { "data-testid": "admit-button", "data-user-id": p.userId, type: "button" },
          "Admit",
        );
        btn.addEventListener("click", () => void admit([p.userId]));
        li.append(btn);
      }
      lobby.append(li);
    }
  }
  $("lobby-count").textContent = String(lobbyCount);
}

/** JoinBreakoutRoom into our assigned room: its `participant_moved` moves media there. */
async function enterRoom(): Promise<void> {
  try {
    await client().breakouts.joinBreakoutRoom({ sessionId: state.sessionId });
  } catch (err) {
    showError("enter room", err);
  }
}

async function admit(userIds: string[]): Promise<void> {
  try {
    await client().sessions.admitParticipants({
      sessionId: state.sessionId,
      userIds,
      all: userIds.length === 0,
    });
  } catch (err) {
    showError("admit", err);
  }
}

// ------------------------------------------------------------------------- interaction

function startInteraction(): void {
  if (state.interactionStarted) {
    return;
  }
  state.interactionStarted = true;
  follow();
}

/**
 * Follows `state.roomId`: ends the feed of the room the page left, clears that room's chat,
 * hands and polls, and subscribes to the new room's feed from its beginning (its history
 * replays, so a return to the main room shows the main chat again).
 */
function follow(): void {
  if (!state.interactionStarted || state.feed?.roomId === state.roomId) {
    return;
  }
  state.feed?.abort.abort();
  const roomId = state.roomId;
  const abort = new AbortController();
  state.abort.signal.addEventListener("abort", () => abort.abort(), { once: true });
  state.feed = { roomId, abort };
  $("chat-log").replaceChildren();
  $("chat-log").dataset.roomId = roomId;
  $("polls").replaceChildren();
  state.polls.clear();
  state.hands.clear();
  setHand(false);
  renderRoster();
  void (async () => {
    try {
      for await (const event of subscribeInteraction(
        client(),
        { sessionId: state.sessionId, breakoutRoomId: roomId },
        { signal: abort.signal },
      )) {
        if (abort.signal.aborted) {
          break;
        }
        onInteraction(event);
      }
    } catch (err) {
      // A feed the page already left may fail on its way out (the room closed): not an error.
      if (!abort.signal.aborted && state.feed?.abort === abort) {
        showError("interaction feed", err);
      }
    }
  })();
}

function setHand(up: boolean): void {
  $("hand-state").textContent = up ? "raised" : "down";
  $("hand-state").dataset.state = up ? "raised" : "down";
  $("raise-hand").textContent = up ? "Lower hand" : "Raise hand";
}

// ------------------------------------------------------------------------- breakout rooms

/** Breakout events of the session feed: room names, our own moves, broadcasts, closings. */
function onBreakout(event: pb.events.Event): void {
  const p = event.payload;
  const live = event.seq > state.joinSeq;
  const me = state.me?.userId ?? "";
  switch (p.case) {
    case "breakoutRoomsCreated":
      for (const room of p.value.rooms) {
        state.roomNames.set(room.id, room.name);
        // An assignment is the participant's room for chat, hands and polls (the server's
        // rule), entered or not: with `move_immediately = false` only media waits for
        // JoinBreakoutRoom.
        for (const a of room.participants) {
          if (a.leftAt === undefined) {
            placeUser(a.userId, room.id, live, a.joinedAt !== undefined);
          }
        }
      }
      break;
    case "participantAssigned":
      for (const a of p.value.assignments) {
        if (a.leftAt === undefined) {
          placeUser(a.userId, p.value.breakoutRoomId, live, a.joinedAt !== undefined);
        }
      }
      break;
    case "participantMoved":
      placeUser(p.value.userId, p.value.toBreakoutRoomId, live);
      break;
    case "breakoutRoomClosed":
      if (p.value.room !== undefined) {
        state.roomNames.set(p.value.room.id, p.value.room.name);
        for (const user of p.value.returnedUserIds) {
          placeUser(user, "", live);
        }
        if (live && state.roomId === p.value.room.id) {
          placeUser(me, "", live);
        }
      }
      break;
    case "breakoutRoomsClosed":
      for (const user of p.value.returnedUserIds) {
        placeUser(user, "", live);
      }
      if (live && p.value.breakoutRoomIds.includes(state.roomId)) {
        placeUser(me, "", live);
      }
      break;
    case "breakoutBroadcast": {
      const m = p.value.message;
      if (m !== undefined && (isStaff(state.me) || m.breakoutRoomIds.includes(state.roomId))) {
        addBroadcast(m);
      }
      break;
    }
    default:
      break;
  }
  if (isStaff(state.me)) {
    refreshRooms();
  }
}

/** `user` is now in `roomId` ("" = main room). Our own room changes only for live events:
 * the join response already told where we were when the feed's replay ends. */
function placeUser(user: string, roomId: string, live: boolean, entered = true): void {
  const p = state.roster.get(user);
  if (user === state.me?.userId) {
    if (!live) {
      // Replayed: the join told our room; only whether we entered it is learnt here.
      if (roomId === state.roomId) {
        state.entered = entered;
        renderRoom();
      }
      return;
    }
    if (state.entered !== entered) {
      state.entered = entered;
      renderRoom();
    }
    if (state.roomId !== roomId) {
      state.roomId = roomId;
      // Broadcasts belong to the room round the page was in.
      $("broadcast-list").replaceChildren();
      show("broadcasts", false);
      renderRoom();
      follow();
    }
  }
  if (p !== undefined) {
    p.breakoutRoomId = user === state.me?.userId ? state.roomId : roomId;
  }
  renderRoster();
}

/** The room bar: which room the page shows (a name fetched when no event named it). */
function renderRoom(): void {
  const box = $("room-name");
  const id = state.roomId;
  box.dataset.roomId = id;
  box.dataset.room = id ? "breakout" : "main";
  document.body.dataset.roomId = id;
  // Assigned without being moved: chat is the room's already, media follows on entering.
  show("enter-room", id !== "" && !state.entered);
  if (!id) {
    box.textContent = "Main room";
    return;
  }
  const name = state.roomNames.get(id);
  box.textContent = name ?? "Breakout room";
  if (name === undefined && state.client !== undefined) {
    void client()
      .breakouts.getBreakoutRoom({ breakoutRoomId: id })
      .then((r) => {
        if (r.room !== undefined) {
          state.roomNames.set(id, r.room.name);
          if (state.roomId === id) {
            box.textContent = r.room.name;
          }
        }
      })
      .catch((err: unknown) => console.warn("GetBreakoutRoom", err));
  }
}

function addBroadcast(m: pb.breakout.BreakoutBroadcastMessage): void {
  const list = $("broadcast-list");
  if (list.querySelector(`[data-message-id="${CSS.escape(m.id)}"]`)) {
    return;
  }
  const li = el("li", {
    "data-testid": "broadcast-message",
    "data-message-id": m.id,
    "data-sender": m.sender?.userId ?? "",
  });
  li.append(el("b", {}, `${m.sender?.displayName || "Instructor"} to all rooms: `));
  li.append(el("span", { "data-testid": "broadcast-text" }, m.text));
  list.prepend(li);
  show("broadcasts", true);
}

let roomsTimer: ReturnType<typeof setTimeout> | undefined;

/** Staff: the open rooms with counts, from ListBreakoutRooms shortly after each change
 * (one call for a burst of events, e.g. the feed's replay). */
function refreshRooms(): void {
  if (roomsTimer !== undefined) {
    return;
  }
  roomsTimer = setTimeout(() => {
    roomsTimer = undefined;
    void (async () => {
      try {
        const rooms = new Map<string, BreakoutRoom>();
        let pageToken = "";
        do {
          const page = await client().breakouts.listBreakoutRooms({
            sessionId: state.sessionId,
            pageSize: 100,
            pageToken,
          });
          for (const r of page.rooms) {
            rooms.set(r.id, r);
            state.roomNames.set(r.id, r.name);
          }
          pageToken = page.nextPageToken;
        } while (pageToken);
        state.openRooms = rooms;
        renderRooms();
      } catch (err) {
        showError("breakout rooms", err);
      }
    })();
  }, 200);
}

function renderRooms(): void {
  const list = $("breakout-list");
  list.replaceChildren();
  for (const r of state.openRooms.values()) {
    const li = el(
      "li",
      {
        "data-testid": "breakout-room-item",
        "data-room-id": r.id,
        "data-name": r.name,
        "data-count": String(r.participantCount),
      },
      `${r.name}: ${r.participantCount}/${r.capacity}`,
    );
    list.append(li);
  }
  $("breakout-count").textContent = String(state.openRooms.size);
  $("breakout-count").dataset.count = String(state.openRooms.size);
  if (state.openRooms.size === 0) {
    $("broadcast-list").replaceChildren();
    show("broadcasts", false);
  }
}

function onInteraction(event: pb.events.Event): void {
  const p = event.payload;
  switch (p.case) {
    case "chatMessagePosted":
      if (p.value.message !== undefined) {
        addChat(p.value.message);
      }
      break;
    case "chatMessageDeleted": {
      const li = document.querySelector(`[data-message-id="${CSS.escape(p.value.messageId)}"]`);
      li?.remove();
      break;
    }
    case "handRaised":
    case "handLowered":
    case "handAcknowledged": {
      const hand = p.value.handRaise;
      if (hand?.raiser !== undefined) {
        const up = hand.status === pb.interaction.HandRaiseStatus.ACTIVE;
        state.hands.set(hand.raiser.userId, up);
        if (hand.raiser.userId === state.me?.userId) {
          setHand(up);
        }
        renderRoster();
      }
      break;
    }
    case "pollCreated":
      if (p.value.poll !== undefined) {
        state.polls.set(p.value.poll.id, { poll: p.value.poll, results: undefined, mine: [] });
        renderPoll(p.value.poll.id);
      }
      break;
    case "pollResultsChanged": {
      const entry = state.polls.get(p.value.pollId);
      if (entry !== undefined && p.value.results !== undefined && p.value.results.options.length) {
        entry.results = p.value.results;
        renderPoll(p.value.pollId);
      }
      break;
    }
    case "pollClosed": {
      const poll = p.value.poll;
      const entry = poll === undefined ? undefined : state.polls.get(poll.id);
      if (poll !== undefined && entry !== undefined) {
        entry.poll = poll;
        entry.results = p.value.results ?? entry.results;
        renderPoll(poll.id);
      }
      break;
    }
    default:
      break;
  }
}

function addChat(m: pb.interaction.ChatMessage): void {
  const log = $("chat-log");
  if (log.querySelector(`[data-message-id="${CSS.escape(m.id)}"]`)) {
    return;
  }
  const li = el("li", {
    "data-testid": "chat-message",
    "data-message-id": m.id,
    "data-sender": m.sender?.userId ?? "",
  });
  li.append(el("b", {}, `${m.sender?.displayName || m.sender?.userId || "system"}: `));
  li.append(el("span", { "data-testid": "chat-text" }, m.text));
  log.append(li);
  log.scrollTop = log.scrollHeight;
}

async function sendChat(): Promise<void> {
  const box = input("chat-input");
  const text = box.value.trim();
  if (!text) {
    return;
  }
  try {
    await client().interaction.sendChatMessage({
      scope: scope(),
      text,
      type: pb.interaction.ChatMessageType.TEXT,
    });
    box.value = "";
  } catch (err) {
    showError("chat", err);
  }
}

async function toggleHand(): Promise<void> {
  const up = state.hands.get(state.me?.userId ?? "") ?? false;
  try {
    if (up) {
      await client().interaction.lowerHand({ scope: scope() });
    } else {
      await client().interaction.raiseHand({ scope: scope() });
    }
  } catch (err) {
    showError("hand", err);
  }
}

function renderPoll(pollId: string): void {
  const entry = state.polls.get(pollId);
  if (entry === undefined) {
    return;
  }
  const { poll, results } = entry;
  const open = poll.status !== pb.interaction.PollStatus.CLOSED;
  let box = document.querySelector<HTMLElement>(`[data-poll-id="${CSS.escape(pollId)}"]`);
  if (box === null) {
    box = el("div", { "data-testid": "poll", "data-poll-id": pollId, class: "poll" });
    $("polls").prepend(box);
  }
  box.dataset.status = open ? "open" : "closed";
  box.replaceChildren();
  box.append(el("div", { "data-testid": "poll-question", class: "question" }, poll.question));
  const list = el("ol", {});
  for (const option of poll.options) {
    const li = el("li", {});
    const chosen = entry.mine.includes(option.index);
    const btn = el(
      "button",
      {
        type: "button",
        "data-testid": "poll-option",
        "data-index": String(option.index),
        "data-chosen": chosen ? "true" : "false",
      },
      option.text,
    );
    btn.disabled = !open;
    btn.addEventListener("click", () => void answer(pollId, option.index));
    li.append(btn);
    const count = results?.options.find((o) => o.index === option.index)?.count;
    li.append(
      el(
        "span",
        { "data-testid": "poll-result", "data-index": String(option.index) },
        count === undefined ? "" : ` ${count}`,
      ),
    );
    list.append(li);
  }
  box.append(list);
  box.append(
    el(
      "div",
      { "data-testid": "poll-respondents" },
      results === undefined ? "results after the poll closes" : `${results.respondentCount} answered`,
    ),
  );
  const respondents = box.querySelector<HTMLElement>("[data-testid=poll-respondents]");
  if (respondents !== null) {
    respondents.dataset.count = String(results?.respondentCount ?? "");
  }
}

async function answer(pollId: string, index: number): Promise<void> {
  const entry = state.polls.get(pollId);
  try {
    await client().interaction.respondToPoll({
      sessionId: state.sessionId,
      pollId,
      optionIndexes: [index],
    });
    if (entry !== undefined) {
      entry.mine = [index];
      renderPoll(pollId);
    }
  } catch (err) {
    showError("poll", err);
  }
}

// ------------------------------------------------------------------------- media

async function media(): Promise<MediaSession> {
  if (state.media !== undefined) {
    return state.media;
  }
  const session = new MediaSession(client(), {
    sessionId: state.sessionId,
    breakoutRoomId: state.roomId,
    rtcConfiguration: { iceServers: state.iceServers },
  });
  state.media = session;
  const stateBox = $("media-state");
  session.on("connection-state", ({ target, state: s }) => {
    stateBox.dataset[target] = s;
    stateBox.textContent = `publisher: ${stateBox.dataset.publisher ?? "-"}, subscriber: ${
      stateBox.dataset.subscriber ?? "-"
    }`;
  });
  session.on("track-published", (track) => {
    // A class page watches everyone who publishes: subscribe to every announced track.
    session.subscribe([track.id]).catch((err: unknown) => showError("subscribe", err));
  });
  session.on("track-unpublished", (track) => {
    document.querySelector(`[data-track-id="${CSS.escape(track.id)}"]`)?.remove();
  });
  session.on("remote-track", (remote) => attachRemote(remote));
  // New connections replace the old ones (breakout move, media restart): their tracks ended.
  const clear = (): void => $("remote-media").replaceChildren();
  session.on("moved", clear);
  session.on("restarted", () => {
    clear();
    const box = $("media-state");
    box.dataset.restarts = String(Number(box.dataset.restarts ?? "0") + 1);
  });
  session.on("closed", (err) => {
    if (err !== undefined) {
      showError("media", err);
    }
  });
  await session.start();
  $("media-state").dataset.started = "true";
  return session;
}

function attachRemote(remote: RemoteTrack): void {
  if (remote.track.kind !== "video") {
    const audio = el("audio", { "data-testid": "remote-audio" });
    audio.autoplay = true;
    audio.srcObject = new MediaStream([remote.track]);
    $("remote-media").append(audio);
    return;
  }
  const video = el("video", {
    "data-testid": "remote-video",
    "data-track-id": remote.info?.id ?? "",
    "data-user-id": remote.info?.userId ?? "",
    "data-frames": "0",
    playsinline: "",
  });
  video.muted = true;
  video.autoplay = true;
  video.srcObject = new MediaStream([remote.track]);
  countFrames(video);
  $("remote-media").append(video);
  void video.play().catch((err: unknown) => console.warn("remote video play()", err));
}

/** Keeps `data-frames` at the number of frames the element presented. */
function countFrames(video: HTMLVideoElement): void {
  let frames = 0;
  const tick = (): void => {
    frames += 1;
    video.dataset.frames = String(frames);
    video.requestVideoFrameCallback(tick);
  };
  video.requestVideoFrameCallback(tick);
}

async function publishCamera(): Promise<void> {
  const btn = $("publish") as HTMLButtonElement;
  btn.disabled = true;
  try {
    const session = await media();
    const stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
    state.local = stream;
    const local = $("local-video") as HTMLVideoElement;
    local.srcObject = stream;
    local.hidden = false;
    void local.play().catch(() => undefined);
    const tracks = await session.publish(stream);
    $("publish-state").textContent = `publishing ${tracks.length} tracks`;
    $("publish-state").dataset.tracks = tracks.map((t) => t.id).join(",");
  } catch (err) {
    btn.disabled = false;
    showError("publish", err);
  }
}

async function watchMedia(): Promise<void> {
  const btn = $("watch-media") as HTMLButtonElement;
  btn.disabled = true;
  try {
    const session = await media();
    const ids = [...session.tracks.keys()];
    if (ids.length > 0) {
      await session.subscribe(ids);
    }
  } catch (err) {
    btn.disabled = false;
    showError("media", err);
  }
}

// ------------------------------------------------------------------------- wiring

async function leave(): Promise<void> {
  try {
    await state.media?.close();
    await client().sessions.leaveSession({ sessionId: state.sessionId });
  } catch (err) {
    showError("leave", err);
  }
}

function wire(): void {
  $("join").addEventListener("click", () => void join());
  $("chat-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    void sendChat();
  });
  $("raise-hand").addEventListener("click", () => void toggleHand());
  $("admit-all").addEventListener("click", () => void admit([]));
  $("publish").addEventListener("click", () => void publishCamera());
  $("watch-media").addEventListener("click", () => void watchMedia());
  $("leave").addEventListener("click", () => void leave());
  $("enter-room").addEventListener("click", () => void enterRoom());
  const params = new URLSearchParams(location.search);
  input("token").value = params.get("token") ?? "";
  input("session-id").value = params.get("session") ?? "";
  input("display-name").value = params.get("name") ?? "";
  input("join-link").value = params.get("join") ?? "";
  setStatus("signed-out");
  document.body.dataset.ready = "true";
  if ((params.get("token") && params.get("session")) || (params.get("join") && params.get("name"))) {
    void join();
  }
}

wire();
