// placeholder: the replicas view (being built)
import { app, h } from "./dom.js";
app().append(h("p", { class: "muted" }, "replicas: coming soon"));
