// Bar charts drawn as SVG by hand: one group of bars per label, series stacked or side by side.
// Every bar carries data-series / data-label / data-value and a <title>, so a reader (or a test)
// can read the exact number behind it.
const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// the smallest 1/2/5 x 10^k that is at least value: a round grid step
function niceStep(value) {
  if (value <= 0) return 1;
  const decade = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 5, 10]) if (m * decade >= value) return m * decade;
  return 10 * decade;
}

// labels: ["2026-11-28", ...]; series: [{name, className, values: [number per label]}]
export function barChart({ title, labels, series, stacked = true, format = String, width = 720, height = 220 }) {
  const pad = { left: 64, right: 12, top: 28, bottom: 36 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const totals = labels.map((_, i) => (stacked
    ? series.reduce((s, x) => s + x.values[i], 0)
    : Math.max(0, ...series.map((x) => x.values[i]))));
  const top = 4 * niceStep(Math.max(0, ...totals) / 4);   // four round grid steps
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": title });
  root.append(svg("text", { x: pad.left, y: 16, class: "chart-title" }, title));
  for (let t = 0; t <= 4; t++) {
    const y = pad.top + plotH - (plotH * t) / 4;
    root.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y, y2: y, class: "grid" }));
    root.append(svg("text", { x: pad.left - 6, y: y + 4, class: "axis", "text-anchor": "end" }, format((top * t) / 4)));
  }
  const slot = plotW / Math.max(1, labels.length);
  const barW = Math.max(2, slot * 0.7);
  labels.forEach((label, i) => {
    const x0 = pad.left + i * slot + (slot - barW) / 2;
    let base = 0;
    series.forEach((s, j) => {
      const v = s.values[i];
      const w = stacked ? barW : barW / series.length;
      const x = stacked ? x0 : x0 + j * w;
      const hgt = (plotH * v) / top;
      const y = pad.top + plotH - hgt - (stacked ? (plotH * base) / top : 0);
      const bar = svg("rect", { x, y, width: w, height: Math.max(0, hgt), class: `bar ${s.className}`,
        "data-series": s.name, "data-label": label, "data-value": String(v) });
      bar.append(svg("title", {}, `${label} · ${s.name}: ${format(v)}`));
      root.append(bar);
      if (stacked) base += v;
    });
    if (labels.length <= 16 || i % Math.ceil(labels.length / 16) === 0) {
      root.append(svg("text", { x: x0 + barW / 2, y: height - pad.bottom + 16, class: "axis", "text-anchor": "middle" },
        label.slice(5)));
    }
  });
  let lx = pad.left;
  for (const s of series) {
    root.append(svg("rect", { x: lx, y: height - 12, width: 10, height: 10, class: `bar ${s.className}` }));
    root.append(svg("text", { x: lx + 14, y: height - 3, class: "axis" }, s.name));
    lx += 24 + 7 * s.name.length;
  }
  return root;
}
