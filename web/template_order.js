// The demo first in the template browser. ComfyUI lists a pack's example workflows in the order its server's glob
// returns them (directory order, which differs from disk to disk), and the browser's default sort keeps that order.
// This puts the pack's own "Start here" template first and the rest by title, and leaves every other pack's list
// as the server sent it.
import { api } from "../../scripts/api.js";

// this file is served at /extensions/<pack folder>/template_order.js; the folder name is the pack's key in the list
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/extensions/")[1].split("/")[0]);
const FIRST = "Start here";

function packOrder(a, b) {
    const first = Number(b.startsWith(FIRST)) - Number(a.startsWith(FIRST));
    return first || a.localeCompare(b);
}

if (typeof api.getWorkflowTemplates === "function") {
    const listTemplates = api.getWorkflowTemplates.bind(api);
    api.getWorkflowTemplates = async (...args) => {
        const listed = await listTemplates(...args);
        if (listed && Array.isArray(listed[PACK])) listed[PACK] = [...listed[PACK]].sort(packOrder);
        return listed;
    };
}
