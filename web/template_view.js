// The pack's templates open at the view saved in the file (the demo: 80 %, its Note and first groups in sight).
// Frontends from 1.45 fit every template to the window when it is opened from the template browser, whatever view
// the file saves; a 19-node graph then opens at 25-40 %, too small to read. Workflow files opened any other way
// already get their saved view. This applies only to the pack's own example files (they carry
// extra.reward_steering_template), only once per opening, and not when "Save and restore canvas position and zoom
// level in workflows" (Comfy.EnableWorkflowViewRestore) is off.
import { app } from "../../scripts/app.js";

const MARK = "reward_steering_template";
const frame = () => new Promise((resolve) => requestAnimationFrame(() => resolve()));

function viewRestoreOn() {
    const settings = app.extensionManager?.setting ?? app.ui?.settings;
    const value = settings?.get ? settings.get("Comfy.EnableWorkflowViewRestore")
        : settings?.getSettingValue?.("Comfy.EnableWorkflowViewRestore");
    return value !== false;
}

async function applySavedView(ds) {
    // 1.58 places the camera in a step scheduled after the load; wait for it (without holding up the load),
    // then set the saved view
    await frame();
    for (let i = 0; i < 120 && app.pendingCamera; i++) await frame();
    await frame();
    const canvas = app.canvas;
    if (!canvas?.ds) return;
    canvas.ds.scale = ds.scale;
    canvas.ds.offset = [ds.offset[0], ds.offset[1]];
    canvas.setDirty?.(true, true);
}

app.registerExtension({
    name: "RewardSteering.TemplateView",
    afterConfigureGraph() {
        const extra = app.graph?.extra;
        const ds = extra?.ds;
        if (!extra?.[MARK] || !ds || !Array.isArray(ds.offset) || !(ds.scale > 0)) return;
        delete extra[MARK];          // once: switching tabs back to this workflow keeps the user's own view
        if (viewRestoreOn()) applySavedView({ scale: ds.scale, offset: [...ds.offset] });
    },
});
