// placeholder: the events view (being built)
import { app, h } from "./dom.js";
app().append(h("p", { class: "muted" }, "events: coming soon"));
