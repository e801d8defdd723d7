// Manual Pick Reward: the grid a person answers while a sampler waits (server side: nodes/manual_pick.py).
//
// The server sends "reward_steering.manual_pick" to the tab that queued the run, one request at a time.  This
// script shows each request as a grid -- step, steps left, batch item, prompt -- the person selects candidates
// (mouse; keys 1-9 toggle, arrows move, Space toggles, Enter submits) and the answer goes back with the
// request's token, prompt id and this tab's client id, so a stale or foreign answer is refused by the server.
// "Cancel run" interrupts the run; the server's close event (answered, timed out, interrupted) removes the grid.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ROUTE = "/reward_steering/manual_pick";
const REQUEST_EVENT = "reward_steering.manual_pick";
const CLOSE_EVENT = "reward_steering.manual_pick.close";
const STYLE_ID = "rs-manual-pick-style";

const queue = [];          // requests waiting to be shown, in arrival (= queue) order
let current = null;        // {request, selected: [indices in click order], root, timer, focus}
let shownCount = 0;        // requests shown in this tab so far (the label "request n")
let queueRemaining = 0;    // prompts waiting in ComfyUI's queue (from the status event)

function addStyle() {
    if (document.getElementById(STYLE_ID)) return;
    const style = document.createElement("style");
    style.id = STYLE_ID;
    style.textContent = `
.rs-mp-backdrop { position: fixed; inset: 0; background: rgba(0,0,0,0.55); z-index: 100000;
  display: flex; align-items: center; justify-content: center; font-family: sans-serif; }
.rs-mp-dialog { background: var(--comfy-menu-bg, #202020); color: var(--fg-color, #ddd); border-radius: 8px;
  border: 1px solid var(--border-color, #555); padding: 14px 18px; max-width: 92vw; max-height: 92vh;
  overflow: auto; box-shadow: 0 8px 32px rgba(0,0,0,0.6); outline: none; }
.rs-mp-title { font-size: 16px; font-weight: bold; margin-bottom: 6px; }
.rs-mp-labels { font-size: 13px; line-height: 1.5; margin-bottom: 8px; }
.rs-mp-labels .rs-mp-prompt { font-style: italic; white-space: pre-wrap; }
.rs-mp-question { font-size: 14px; margin: 6px 0 10px; }
.rs-mp-grid { display: grid; gap: 10px; }
.rs-mp-cell { position: relative; padding: 4px; border: 3px solid transparent; border-radius: 6px;
  background: var(--comfy-input-bg, #333); cursor: pointer; color: inherit; }
.rs-mp-cell:focus { outline: 2px dashed var(--fg-color, #ddd); outline-offset: 2px; }
.rs-mp-cell[aria-pressed="true"] { border-color: #3fb950; }
.rs-mp-cell img { display: block; width: var(--rs-mp-size, 160px); height: var(--rs-mp-size, 160px);
  object-fit: contain; image-rendering: pixelated; }
.rs-mp-cell .rs-mp-num { position: absolute; left: 6px; top: 6px; background: rgba(0,0,0,0.65); color: #fff;
  font-size: 12px; padding: 1px 5px; border-radius: 3px; }
.rs-mp-cell .rs-mp-mark { position: absolute; right: 6px; top: 6px; background: #3fb950; color: #000;
  font-size: 13px; font-weight: bold; padding: 1px 6px; border-radius: 3px; display: none; }
.rs-mp-cell[aria-pressed="true"] .rs-mp-mark { display: block; }
.rs-mp-footer { display: flex; gap: 10px; align-items: center; margin-top: 12px; flex-wrap: wrap; }
.rs-mp-footer button { padding: 6px 14px; font-size: 14px; border-radius: 4px; cursor: pointer;
  border: 1px solid var(--border-color, #555); background: var(--comfy-input-bg, #333); color: inherit; }
.rs-mp-footer .rs-mp-submit { background: #238636; color: #fff; border-color: #2ea043; }
.rs-mp-footer .rs-mp-cancel { background: #6e2a2a; color: #fff; }
.rs-mp-status { font-size: 12px; opacity: 0.85; margin-left: auto; }
.rs-mp-help { font-size: 11px; opacity: 0.7; margin-top: 6px; }`;
    document.head.appendChild(style);
}

function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;   // never innerHTML: prompts are user text
    return node;
}

function nodeTitle(nodeId) {
    try {
        const node = app.graph?.getNodeById?.(Number(nodeId)) ?? app.graph?.getNodeById?.(nodeId);
        if (node) return `${node.title || node.type} #${nodeId}`;
    } catch (e) { /* a subgraph id or a node of another graph */ }
    return nodeId != null ? `node #${nodeId}` : "a sampler";
}

function enqueue(request) {
    if (!request || !request.token) return;
    if (request.client_id && api.clientId && request.client_id !== api.clientId) return;  // not this tab's run
    if (current?.request.token === request.token || queue.some((r) => r.token === request.token)) return;
    request.deadline = Date.now() + (request.remaining ?? request.timeout) * 1000;   // the page's own clock
    queue.push(request);
    if (!current) showNext();
    else updateStatus();
}

function drop(predicate) {
    for (let i = queue.length - 1; i >= 0; i--) if (predicate(queue[i])) queue.splice(i, 1);
    if (current && predicate(current.request)) close();
}

function close() {
    if (!current) return;
    clearInterval(current.timer);
    current.root.remove();
    current = null;
    showNext();
}

function showNext() {
    if (current || queue.length === 0) return;
    addStyle();
    const request = queue.shift();
    shownCount += 1;
    const state = { request, selected: [], timer: null, focus: 0, busy: false };
    current = state;

    const root = el("div", "rs-mp-backdrop");
    root.dataset.testid = "rs-manual-pick";
    root.dataset.token = request.token;
    root.dataset.promptId = request.prompt_id ?? "";
    const dialog = el("div", "rs-mp-dialog");
    dialog.tabIndex = -1;
    dialog.setAttribute("role", "dialog");
    dialog.setAttribute("aria-label", "Manual pick");
    root.appendChild(dialog);
    state.root = root;

    dialog.appendChild(el("div", "rs-mp-title", `Manual pick \u2014 ${nodeTitle(request.node_id)} asks`));
    const labels = el("div", "rs-mp-labels");
    const lines = [];
    if (request.step != null && request.steps != null) {
        lines.push(`Step ${request.step + 1} of ${request.steps} \u00b7 ${request.steps_left} step${request.steps_left === 1 ? "" : "s"} left`);
    }
    lines.push(`Batch item ${request.item + 1} of ${request.items} \u00b7 ${request.k} candidates \u00b7 question ${request.seq} of this run`);
    lines.push(`Run ${String(request.prompt_id ?? "?").slice(0, 8)} \u00b7 request ${shownCount} in this tab`);
    for (const line of lines) labels.appendChild(el("div", "rs-mp-line", line));
    const promptLine = el("div", "rs-mp-prompt", request.prompt ? `Prompt: ${request.prompt}` : "Prompt: (none given to the sampler)");
    labels.appendChild(promptLine);
    dialog.appendChild(labels);
    dialog.appendChild(el("div", "rs-mp-question",
        (request.question || "Pick the candidates you like") +
        (request.mode === "ranked" ? " (click in order of preference: first = best)" : "")));

    const grid = el("div", "rs-mp-grid");
    const columns = Math.ceil(Math.sqrt(request.k));
    grid.style.gridTemplateColumns = `repeat(${columns}, auto)`;
    const size = Math.max(96, Math.min(220, Math.floor(Math.min(window.innerWidth * 0.8, window.innerHeight * 0.6) / columns) - 24));
    grid.style.setProperty("--rs-mp-size", `${size}px`);
    state.cells = request.images.map((url, i) => {
        const cell = el("button", "rs-mp-cell");
        cell.type = "button";
        cell.dataset.index = String(i);
        cell.setAttribute("aria-pressed", "false");
        cell.setAttribute("aria-label", `candidate ${i + 1}`);
        const img = el("img");
        img.alt = `candidate ${i + 1}`;
        img.draggable = false;
        img.addEventListener("load", () => checkReady(state));
        img.addEventListener("error", () => checkReady(state));
        img.src = api.apiURL(url);
        cell.appendChild(img);
        cell.appendChild(el("span", "rs-mp-num", String(i + 1)));
        cell.appendChild(el("span", "rs-mp-mark", "\u2713"));
        cell.addEventListener("click", () => { state.focus = i; toggle(state, i); });
        grid.appendChild(cell);
        return cell;
    });
    dialog.appendChild(grid);

    const footer = el("div", "rs-mp-footer");
    const submit = el("button", "rs-mp-submit", "Submit");
    submit.type = "button";
    submit.dataset.testid = "rs-mp-submit";
    submit.addEventListener("click", () => send(state, "submit"));
    const none = el("button", "rs-mp-none", "No preference");
    none.type = "button";
    none.title = "submit with nothing selected: this step is not steered";
    none.addEventListener("click", () => { state.selected = []; send(state, "submit"); });
    const cancel = el("button", "rs-mp-cancel", "Cancel run");
    cancel.type = "button";
    cancel.dataset.testid = "rs-mp-cancel";
    cancel.addEventListener("click", () => send(state, "cancel"));
    const status = el("span", "rs-mp-status");
    state.status = status;
    footer.append(submit, none, cancel, status);
    dialog.appendChild(footer);
    dialog.appendChild(el("div", "rs-mp-help",
        "Click or press 1\u20139 to select \u00b7 arrows move \u00b7 Space toggles \u00b7 Enter submits"));

    dialog.addEventListener("keydown", (e) => onKey(state, e));
    document.body.appendChild(root);
    state.timer = setInterval(() => updateStatus(), 250);
    updateStatus();
    (state.cells[0] ?? dialog).focus();
}

function checkReady(state) {
    if (state.cells.every((c) => c.querySelector("img").complete)) state.root.dataset.ready = "1";
}

function toggle(state, i) {
    if (state.busy) return;
    const at = state.selected.indexOf(i);
    if (at >= 0) state.selected.splice(at, 1);
    else state.selected.push(i);
    state.cells.forEach((cell, j) => {
        const rank = state.selected.indexOf(j);
        cell.setAttribute("aria-pressed", rank >= 0 ? "true" : "false");
        cell.querySelector(".rs-mp-mark").textContent =
            state.request.mode === "ranked" && rank >= 0 ? `#${rank + 1}` : "\u2713";
    });
    state.root.dataset.selected = state.selected.join(",");
    updateStatus();
}

function onKey(state, e) {
    const k = state.cells.length;
    const columns = Math.ceil(Math.sqrt(k));
    const move = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -columns, ArrowDown: columns }[e.key];
    if (move !== undefined) {
        state.focus = Math.min(k - 1, Math.max(0, state.focus + move));
        state.cells[state.focus].focus();
    } else if (e.key === " ") {
        toggle(state, state.focus);
    } else if (e.key === "Enter") {
        send(state, "submit");
    } else if (/^[1-9]$/.test(e.key) && Number(e.key) <= k) {
        state.focus = Number(e.key) - 1;
        state.cells[state.focus].focus();
        toggle(state, state.focus);
    } else {
        e.stopPropagation();   // the grid is modal: no key reaches ComfyUI's shortcuts (Delete, Ctrl+Enter, ...)
        return;
    }
    e.preventDefault();
    e.stopPropagation();
}

function updateStatus() {
    if (!current) return;
    const { request, selected, status } = current;
    const left = Math.max(0, Math.round((request.deadline - Date.now()) / 1000));
    const minutes = Math.floor(left / 60);
    const waiting = queue.length + Math.max(0, queueRemaining - 1);
    status.textContent = `${selected.length} selected \u00b7 ${minutes}:${String(left % 60).padStart(2, "0")} left` +
        (waiting > 0 ? ` \u00b7 ${waiting} more waiting` : "");
}

async function send(state, action) {
    if (state.busy || current !== state) return;
    state.busy = true;
    const { request } = state;
    let ok = false;
    try {
        const response = await api.fetchApi(`${ROUTE}/answer`, {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ token: request.token, prompt_id: request.prompt_id, client_id: api.clientId,
                                   action, selected: action === "cancel" ? [] : state.selected }),
        });
        ok = response.ok;
        if (!ok) console.warn("[reward-steering] manual pick answer refused:", response.status, await response.text());
    } catch (e) {
        console.warn("[reward-steering] manual pick answer failed:", e);
    }
    if (current === state) close();   // answered, or the request was already over (stale): either way it is done
}

async function fetchPending() {
    try {
        const response = await api.fetchApi(`${ROUTE}/pending?client_id=${encodeURIComponent(api.clientId ?? "")}`);
        if (response.ok) {
            const body = await response.json();
            if (body.request) enqueue(body.request);
        }
    } catch (e) { /* the server may be restarting */ }
}

app.registerExtension({
    name: "RewardSteering.ManualPick",
    async setup() {
        api.addEventListener(REQUEST_EVENT, (e) => enqueue(e.detail));
        api.addEventListener(CLOSE_EVENT, (e) => drop((r) => r.token === e.detail?.token));
        for (const event of ["execution_interrupted", "execution_error", "execution_success"]) {
            api.addEventListener(event, (e) => {
                const promptId = e.detail?.prompt_id;
                if (promptId) drop((r) => r.prompt_id === promptId);
            });
        }
        // A reloaded tab shows the request its run is waiting on: ask once this tab's client id is known (the
        // first "status" message of the websocket sets it) and again after every reconnect.
        let asked = false;
        api.addEventListener("status", (e) => {
            queueRemaining = e.detail?.exec_info?.queue_remaining ?? 0;
            updateStatus();
            if (!asked && api.clientId) { asked = true; fetchPending(); }
        });
        api.addEventListener("reconnected", () => fetchPending());
        if (api.clientId) { asked = true; fetchPending(); }
    },
});
