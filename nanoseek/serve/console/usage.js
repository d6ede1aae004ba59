// Usage: tokens and spend per day as charts, and the ledger's recent requests, paged.
import { api } from "./api.js";
import { barChart } from "./charts.js";
import { fmtInt, fmtTime, h, table } from "./dom.js";

const PAGE = 10;

export async function usagePage(root, { me }) {
  const days = h("select", { id: "usage-days" }, [7, 14, 30, 90].map((d) => h("option", { value: d, selected: d === 14 }, `${d} days`)));
  const charts = h("div", { id: "usage-charts" });
  const totals = h("p", { id: "usage-totals" });
  const rows = h("div", { id: "usage-requests" });
  root.append(h("div", { class: "card" }, h("h1", {}, "Usage"), h("div", { class: "row" }, days, totals), charts),
    h("div", { class: "card" }, h("h2", {}, "Recent requests"), rows));

  async function drawCharts() {
    const u = await api(`/v1/dashboard/usage?days=${days.value}`);
    const labels = u.days.map((d) => d.date);
    const t = u.total;
    totals.textContent = `all time: ${fmtInt(t.requests)} requests, ${fmtInt(t.cache_hit_tokens + t.cache_miss_tokens)} prompt and ${fmtInt(t.output_tokens)} output tokens, ${t.cost} ${u.currency}`;
    charts.replaceChildren(
      barChart({ title: "Tokens per day", labels, format: (v) => fmtInt(Math.round(v)), series: [
        { name: "cache hit", className: "hit", values: u.days.map((d) => d.cache_hit_tokens) },
        { name: "cache miss", className: "miss", values: u.days.map((d) => d.cache_miss_tokens) },
        { name: "output", className: "out", values: u.days.map((d) => d.output_tokens) }] }),
      barChart({ title: `Spend per day (${u.currency})`, labels, format: (v) => (v < 0.01 && v > 0 ? v.toExponential(1) : v.toFixed(2)),
        series: [{ name: "spend", className: "spend", values: u.days.map((d) => Number(d.cost)) }] }));
  }

  const stack = [];   // `before` cursors of the pages behind us
  async function drawRequests(before) {
    const page = await api(`/v1/dashboard/requests?limit=${PAGE}${before ? `&before=${before}` : ""}`);
    const body = page.data.map((r) => h("tr", { dataset: { requestId: r.request_id } },
      h("td", {}, fmtTime(r.created_at)), h("td", {}, r.model || "–"), h("td", { class: "num" }, fmtInt(r.cache_hit_tokens)),
      h("td", { class: "num" }, fmtInt(r.cache_miss_tokens)), h("td", { class: "num" }, fmtInt(r.output_tokens)),
      h("td", { class: "num cost" }, r.cost ?? "–"), h("td", {}, r.status), h("td", { class: "mono" }, r.request_id)));
    const newer = h("button", { type: "button", id: "req-newer", disabled: !stack.length, onclick: () => { stack.pop(); drawRequests(stack.at(-1)); } }, "← Newer");
    const older = h("button", { type: "button", id: "req-older", disabled: !page.next_before, onclick: () => { stack.push(page.next_before); drawRequests(page.next_before); } }, "Older →");
    rows.replaceChildren(
      page.data.length ? table(["time", "model", "cache hit", "cache miss", "output", `cost (${me.currency})`, "status", "request"], body, { id: "requests-table" })
        : h("p", { class: "muted" }, "No requests yet: try the playground."),
      h("div", { class: "row" }, newer, older));
  }

  days.addEventListener("change", drawCharts);
  await Promise.all([drawCharts(), drawRequests()]);
}
