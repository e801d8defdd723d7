// Live candidate view (server side: samplers/live.py).
//
// At each scored step of a Demon, SMC or tree run the server sends "reward_steering.live" to the tab that queued it:
// a small latent-RGB grid of batch item 0's candidates with each one's reward, weight and kept / resampled mark.
// This script draws the latest grid under the executing node's widgets; when the run ends the grid stays, frozen
// and labelled "final".  The setting "Reward steering: live candidate view" switches drawing off in this tab
// (the server stops sending with REWARD_STEER_LIVE=0).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "reward_steering.live";
const SETTING = "RewardSteering.LiveCandidates";
const LABEL_PX = 26;    // two lines of text under each tile

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

function draw(node, ctx) {
    const view = node.rsLive;
    if (!view?.img?.complete || !view.img.naturalWidth) return;
    const { data } = view;
    const { cols, rows, w, h } = layout(view);
    const top = node.size[1] + 4, left = 4;
    ctx.save();
    ctx.fillStyle = "rgba(20,20,20,0.92)";
    ctx.fillRect(0, top - 4, cols * (w + 4) + 8, rows * (h + LABEL_PX + 4) + 24);
    ctx.fillStyle = "#ddd";
    ctx.font = "12px sans-serif";
    const where = view.frozen ? "final" : "live";
    ctx.fillText(`${data.kind} step ${data.step + 1}/${data.steps}, ${data.shown} of ${data.k} (item 0), green = ` +
                 `${data.mark} - ${where}`, left, top + 10);
    for (let j = 0; j < data.shown; j++) {
        const c = j % cols, r = Math.floor(j / cols);
        const x = left + c * (w + 4), y = top + 16 + r * (h + LABEL_PX + 4);
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
    ctx.restore();
}

function attach(node) {
    if (node.rsLiveHooked) return;
    node.rsLiveHooked = true;
    const previous = node.onDrawForeground;
    node.onDrawForeground = function (ctx) {
        const result = previous?.apply(this, arguments);
        if (!this.flags?.collapsed) draw(this, ctx);
        return result;
    };
}

function show(data) {
    if (!enabled() || !data?.image) return;
    const node = nodeById(data.node);
    if (!node) return;
    attach(node);
    const img = new Image();
    img.onload = () => {
        node.rsLive = { data, img, frozen: false };
        state.count += 1;
        state.step = data.step;
        state.node = String(data.node);
        state.frozen = false;
        app.graph.setDirtyCanvas(true, false);
    };
    img.src = "data:image/png;base64," + data.image;
}

function freezeAll() {
    for (const node of app.graph?._nodes ?? []) {
        if (node.rsLive) node.rsLive.frozen = true;
    }
    if (state.count) state.frozen = true;
    app.graph?.setDirtyCanvas(true, false);
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
            for (const node of app.graph?._nodes ?? []) delete node.rsLive;
            Object.assign(state, { frozen: false });
            app.graph?.setDirtyCanvas(true, false);
        });
    },
});
