// Server: the engine's gauges and counters (the ones /metrics exports), polled while the page is open.
import { api } from "./api.js";
import { fmtInt, h } from "./dom.js";

const POLL_MS = 2000;

export async function serverPage(root) {
  const grid = h("div", { class: "stats", id: "server-stats" });
  const note = h("p", { class: "muted" }, "Read from the same counters GET /metrics exports; tokens/s over the last poll interval.");
  root.append(h("div", { class: "card" }, h("h1", {}, "Server"), grid, note));
  let last = null;
  const stat = (label, value, id) => h("div", { class: "stat" }, h("div", { class: "label" }, label), h("div", { class: "value", id }, value));
  async function poll() {
    const m = await api("/v1/dashboard/server");
    const rate = (key) => (last && m.time > last.time ? ((m[key] - last[key]) / (m.time - last.time)).toFixed(1) : "–");
    grid.replaceChildren(
      stat("model", m.model, "srv-model"),
      stat("engine", m.engine_alive ? "running" : "stopped", "srv-alive"),
      stat("requests running", m.requests_running, "srv-running"),
      stat("requests waiting", m.requests_waiting, "srv-waiting"),
      stat("KV cache in use", `${(100 * m.kv_cache_usage).toFixed(1)} %`, "srv-kv"),
      stat("prefix-cache hit rate", m.prefix_cache_hit_rate === null ? "–" : `${(100 * m.prefix_cache_hit_rate).toFixed(1)} %`, "srv-hit-rate"),
      stat("output tokens/s", rate("generation_tokens_total"), "srv-tps"),
      stat("prompt tokens/s", rate("prompt_tokens_total"), "srv-prompt-tps"),
      stat("output tokens, total", fmtInt(m.generation_tokens_total), "srv-gen-total"),
      stat("uptime", `${Math.round(m.uptime_s)} s`, "srv-uptime"));
    last = m;
  }
  await poll();
  const timer = setInterval(() => poll().catch(() => {}), POLL_MS);
  return () => clearInterval(timer);
}
