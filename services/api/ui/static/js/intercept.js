// placeholder: the intercept view (being built)
import { app, h } from "./dom.js";
app().append(h("p", { class: "muted" }, "intercept: coming soon"));
