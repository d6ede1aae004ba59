// Balance and prices: the key's money, the price sheet, and how the prices were derived.
import { api } from "./api.js";
import { h, table } from "./dom.js";

const KINDS = [["input_hit", "input, cache hit", "cached_tokens_per_s"], ["input_miss", "input, cache miss", "prefill_tokens_per_s"],
  ["output", "output", "decode_tokens_per_s"]];
const limitText = (v) => (v === null ? "unlimited" : String(v));

export async function billingPage(root, { refreshAccount }) {
  const [me, sheet] = await Promise.all([refreshAccount(), api("/v1/pricing")]);
  const card = (label, value, id) => h("div", { class: "stat" }, h("div", { class: "label" }, label), h("div", { class: "value", id }, `${value} ${me.currency}`));
  const d = sheet.derivation;
  root.append(
    h("div", { class: "card" }, h("h1", {}, "Balance"),
      h("div", { class: "stats" }, card("balance", me.balance, "bal-balance"), card("held by requests in flight", me.held, "bal-held"),
        card("available", me.available, "bal-available")),
      h("p", { class: "muted" }, `limits for this key: ${limitText(me.effective_limits.rpm)} requests/min, `
        + `${limitText(me.effective_limits.tpm)} tokens/min, ${limitText(me.effective_limits.concurrency)} at once`)),
    h("div", { class: "card" }, h("h1", {}, `Prices (${sheet.currency} ${sheet.unit})`),
      table(["token", "price", "cost", "measured tokens/s"], KINDS.map(([k, label, tps]) => h("tr", { dataset: { kind: k } },
        h("td", {}, label), h("td", { class: "num price" }, sheet.prices[k]), h("td", { class: "num" }, d.costs[k]), h("td", { class: "num" }, d[tps]))),
      { id: "price-table" }),
      h("h2", {}, "How these prices were derived"),
      h("ul", { id: "derivation" },
        h("li", {}, `hardware: ${d.hardware_cost_per_hour} ${sheet.currency} per hour`),
        h("li", {}, `throughput measured at decode batch size ${d.decode_batch_size}`),
        h("li", {}, `margin: ${d.margin} (price = cost × (1 + margin))`),
        h("li", {}, d.formula),
        h("li", {}, `sheet created ${sheet.created}${sheet.notes ? ` — ${sheet.notes}` : ""}`))));
}
