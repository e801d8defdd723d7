// Live candidate view (server side: samplers/live.py).
//
// At each scored step of a Demon, SMC or tree run the server sends "reward_steering.live" to the tab that queued it:
// a small latent-RGB grid of batch item 0's candidates with each one's reward, weight and kept / resampled mark.
// This script draws the latest grid in a box under the executing node's widgets; when the run ends the grid stays, frozen
// and labelled "final".  The setting "Reward steering: live candidate view" switches drawing off in this tab
// (the server stops sending with REWARD_STEER_LIVE=0).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "reward_steering.live";
const SETTING = "RewardSteering.LiveCandidates";
const LABEL_PX = 26;    // two lines of text under each tile
const WIDGET = "rs_live";

// what the browser test reads: events drawn, the last step, whether the view is frozen
const state = { count: 0, step: null, node: null, frozen: false };
window.__rewardSteeringLive = state;

function enabled() {
    const settings = app.extensionManager?.setting ?? app.ui?.settings;
    const value = settings?.get ? settings.get(SETTING) : settings?.getSettingValue?.(SETTING);
    return value !== false;
}

function nodeById(id) {
    return app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id) ?? null;
}

function layout(view) {
    const cols = Math.min(4, view.data.shown);
    const rows = Math.ceil(view.data.shown / cols);
    const tileW = view.img.naturalWidth / cols, tileH = view.img.naturalHeight / rows;
    const scale = Math.min(2, 160 / Math.max(tileW, tileH));   // at most ~160 px per tile on the node
    return { cols, rows, w: tileW * scale, h: tileH * scale };
}

// The grid lives in a DOM widget (a <canvas> under the node's widgets), so both the classic canvas renderer and the
// Vue node renderer ("Nodes 2.0") show it.
function liveWidget(node) {
    let widget = node.widgets?.find((w) => w.name === WIDGET);
    if (widget) return widget;
    const box = document.createElement("div");
    box.className = "reward-steer-live";
    box.setAttribute("data-reward-steer-live", String(node.id));
    box.style.cssText = "overflow:hidden;background:rgba(20,20,20,0.92);border-radius:4px;";
    const canvas = document.createElement("canvas");
    canvas.style.cssText = "display:block;max-width:100%;";
    canvas.width = canvas.height = 0;
    box.appendChild(canvas);
    widget = node.addDOMWidget(WIDGET, "reward_steer_live", box, {
        serialize: false,        // a view of the run, not a setting: never saved in the workflow or sent
        getValue: () => "",
        setValue: () => {},
        getMinHeight: () => canvas.height + 4,
    });
    widget.serialize = false;
    widget.canvas = canvas;
    return widget;
}

function draw(node) {
    const view = node.rsLive;
    if (!view?.img?.complete || !view.img.naturalWidth) return;
    const { data } = view;
    const { cols, rows, w, h } = layout(view);
    const canvas = liveWidget(node).canvas;
    const width = Math.ceil(cols * (w + 4) + 8), height = Math.ceil(rows * (h + LABEL_PX + 4) + 22);
    const resized = canvas.width !== width || canvas.height !== height;
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    ctx.fillStyle = "#ddd";
    ctx.font = "12px sans-serif";
    const where = view.frozen ? "final" : "live";
    ctx.fillText(`${data.kind} step ${data.step + 1}/${data.steps}, ${data.shown} of ${data.k} (item 0), green = ` +
                 `${data.mark} - ${where}`, 4, 13, width - 8);
    for (let j = 0; j < data.shown; j++) {
        const c = j % cols, r = Math.floor(j / cols);
        const x = 4 + c * (w + 4), y = 20 + r * (h + LABEL_PX + 4);
        const sw = view.img.naturalWidth / cols, sh = view.img.naturalHeight / rows;
        ctx.globalAlpha = view.frozen ? 0.6 : 1.0;
        ctx.imageSmoothingEnabled = false;
        ctx.drawImage(view.img, c * sw, r * sh, sw, sh, x, y, w, h);
        ctx.globalAlpha = 1.0;
        if (data.marks[j]) {   // kept (Demon: positive weight) or resampled (SMC: this item was resampled)
            ctx.strokeStyle = "#3fb950";
            ctx.lineWidth = 2;
            ctx.strokeRect(x + 1, y + 1, w - 2, h - 2);
        }
        ctx.fillStyle = "#ddd";
        ctx.font = "10px monospace";
        ctx.fillText(`r ${data.rewards[j].toFixed(3)}`, x, y + h + 11);
        ctx.fillText(`w ${data.weights[j].toFixed(3)}`, x, y + h + 23);
    }
    if (resized) {   // room for the grid: grow the node, never shrink what the user sized
        const wanted = node.computeSize?.() ?? node.size;
        node.setSize?.([Math.max(node.size[0], wanted[0], width + 20), Math.max(node.size[1], wanted[1])]);
    }
    app.graph?.setDirtyCanvas?.(true, true);
}

function show(data) {
    if (!enabled() || !data?.image) return;
    const node = nodeById(data.node);
    if (!node) return;
    const img = new Image();
    img.onload = () => {
        node.rsLive = { data, img, frozen: false };
        state.count += 1;
        state.step = data.step;
        state.node = String(data.node);
        state.frozen = false;
        draw(node);
    };
    img.src = "data:image/png;base64," + data.image;
}

function freezeAll() {
    for (const node of app.graph?._nodes ?? []) {
        if (node.rsLive) {
            node.rsLive.frozen = true;
            draw(node);
        }
    }
    if (state.count) state.frozen = true;
}

app.registerExtension({
    name: "RewardSteering.LiveCandidates",
    settings: [{
        id: SETTING,
        name: "Reward steering: live candidate view (grid of each scored step's candidates on the sampler node)",
        type: "boolean",
        defaultValue: true,
    }],
    async setup() {
        api.addEventListener(EVENT, (e) => show(e.detail));
        for (const event of ["execution_success", "execution_error", "execution_interrupted"]) {
            api.addEventListener(event, () => freezeAll());
        }
        api.addEventListener("execution_start", () => {   // a new run: drop the previous run's grids
            for (const node of app.graph?._nodes ?? []) {
                delete node.rsLive;
                const canvas = node.widgets?.find((w) => w.name === WIDGET)?.canvas;
                if (canvas) canvas.width = canvas.height = 0;
            }
            Object.assign(state, { frozen: false });
            app.graph?.setDirtyCanvas(true, false);
        });
    },
});
