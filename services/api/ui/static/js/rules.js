// placeholder: the rules view (being built)
import { app, h } from "./dom.js";
app().append(h("p", { class: "muted" }, "rules: coming soon"));
