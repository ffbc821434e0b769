// placeholder: the config view (being built)
import { app, h } from "./dom.js";
app().append(h("p", { class: "muted" }, "config: coming soon"));
