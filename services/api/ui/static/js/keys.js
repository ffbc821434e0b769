// placeholder: the keys view (being built)
import { app, h } from "./dom.js";
app().append(h("p", { class: "muted" }, "keys: coming soon"));
