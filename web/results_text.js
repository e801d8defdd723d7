// Results on the node: after a run, every pack node that returns UI text (Score Images' scores and mean, Exact
// Target's exact answer, the steering nodes' spent and planned cost, best-of-N's scores) shows it in a read-only
// box under its widgets. ComfyUI's frontend keeps a node's UI output in /history but draws only images, so
// without this the demo's comparison of each method with the exact answer is invisible in the page.
// While a node runs, its per-step text comes through ComfyUI's own progress-text preview instead.
import { app } from "../../scripts/app.js";

const PREFIX = "RewardSteer";
const WIDGET = "rs_result";
const LINE_PX = 15;

function resultWidget(node) {
    let widget = node.widgets?.find((w) => w.name === WIDGET);
    if (widget) return widget;
    const box = document.createElement("textarea");
    box.readOnly = true;
    box.className = "reward-steer-result";
    box.setAttribute("data-reward-steer-result", String(node.id));
    box.style.cssText = "width:100%;box-sizing:border-box;resize:none;overflow:auto;white-space:pre-wrap;" +
        "font:12px/15px monospace;background:var(--comfy-input-bg,#222);color:var(--input-text,#ddd);" +
        "border:1px solid var(--border-color,#444);border-radius:4px;padding:4px;";
    widget = node.addDOMWidget(WIDGET, "reward_steer_result", box, {
        serialize: false,        // a result, not a setting: never saved in the workflow or sent with the prompt
        getValue: () => box.value,
        setValue: (v) => { box.value = v ?? ""; },
        getMinHeight: () => Math.min(12, Math.max(2, box.value.split("\n").length)) * LINE_PX + 10,
    });
    widget.serialize = false;
    return widget;
}

function showResult(node, text) {
    const widget = resultWidget(node);
    widget.element.value = text;
    const wanted = node.computeSize?.() ?? node.size;   // grow to fit the text; never shrink what the user sized
    node.setSize?.([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
    node.setDirtyCanvas?.(true, true);
    app.graph?.setDirtyCanvas?.(true, true);
}

app.registerExtension({
    name: "RewardSteering.ResultsText",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData?.name?.startsWith(PREFIX)) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (output) {
            onExecuted?.apply(this, arguments);
            const text = output?.text;
            if (text === undefined || text === null) return;
            showResult(this, Array.isArray(text) ? text.join("\n") : String(text));
        };
    },
});
