// Admin: every key with its usage; create, top up, revoke, per-key limits; the admin trail.
import { ApiError, api } from "./api.js";
import { errorBox, fmtInt, fmtTime, h, table } from "./dom.js";

const limitValue = (input) => (input.value.trim() === "" ? null : Number(input.value));

export async function adminPage(root, { me, refreshAccount }) {
  if (!me.admin) {
    root.append(h("div", { class: "card" }, h("h1", {}, "Admin"),
      errorBox(new ApiError(403, "This key is not an admin key: the admin page needs a key created with `nanoseek keys create --admin`."))));
    return;
  }
  const message = h("div", { id: "admin-message" });
  const keysBox = h("div", { id: "admin-keys" });
  const logBox = h("div", { id: "admin-log" });
  const name = h("input", { id: "new-key-name", placeholder: "name", required: true, maxlength: 64 });
  const balance = h("input", { id: "new-key-balance", placeholder: "balance", value: "0", inputmode: "decimal" });
  const isAdmin = h("input", { id: "new-key-admin", type: "checkbox" });
  const create = h("form", { id: "new-key-form", class: "row" }, name, balance, h("label", { class: "inline" }, isAdmin, " admin"),
    h("button", { type: "submit" }, "Create key"));
  root.append(h("div", { class: "card" }, h("h1", {}, "Keys"), create, message, keysBox),
    h("div", { class: "card" }, h("h2", {}, "Admin actions"), logBox));

  // the outcome is shown once the tables are redrawn, so what it says is what they show
  const act = async (what, fn) => {
    let note;
    try {
      note = h("p", { class: "ok", dataset: { action: what } }, await fn());
    } catch (e) {
      note = errorBox(e);
    }
    await Promise.all([drawKeys(), drawLog(), refreshAccount()]);
    message.replaceChildren(note);
  };

  create.addEventListener("submit", (event) => {
    event.preventDefault();
    act("create", async () => {
      const k = await api("/v1/dashboard/admin/keys", { method: "POST", body: { name: name.value, balance: balance.value, admin: isAdmin.checked } });
      name.value = ""; balance.value = "0"; isAdmin.checked = false;
      return h("span", {}, `Created key ${k.name} (id ${k.id}). Its secret is shown only now: `, h("code", { id: "new-key-secret" }, k.secret));
    });
  });

  async function drawKeys() {
    const { data, currency } = await api("/v1/dashboard/admin/keys");
    keysBox.replaceChildren(table(["id", "name", "admin", `balance (${currency})`, "available", "requests", "tokens", "spend",
      "limits rpm / tpm / concurrency (blank: server default)", "top up", ""], data.map((k) => {
      const revoked = k.revoked_at !== null;
      const lim = ["rpm", "tpm", "concurrency"].map((n) => h("input", { class: "limit", name: n, type: "number", min: 0,
        value: k.limits[n] ?? "", placeholder: String(k.effective_limits[n] ?? "∞"), disabled: revoked }));
      const amount = h("input", { class: "amount", placeholder: "amount", inputmode: "decimal", disabled: revoked });
      const u = k.usage;
      return h("tr", { dataset: { keyId: k.id, keyName: k.name }, class: revoked ? "revoked" : "" },
        h("td", {}, k.id), h("td", {}, k.name, h("div", { class: "muted mono" }, `${k.prefix}…`)), h("td", {}, k.admin ? "yes" : ""),
        h("td", { class: "num balance" }, k.balance), h("td", { class: "num" }, k.available), h("td", { class: "num" }, fmtInt(u.requests)),
        h("td", { class: "num" }, fmtInt(u.cache_hit_tokens + u.cache_miss_tokens + u.output_tokens)), h("td", { class: "num" }, u.cost),
        h("td", {}, lim, h("button", { type: "button", class: "save-limits", disabled: revoked, onclick: () => act("limits", async () => {
          await api(`/v1/dashboard/admin/keys/${k.id}/limits`, { method: "PUT", body: { rpm: limitValue(lim[0]), tpm: limitValue(lim[1]), concurrency: limitValue(lim[2]) } });
          return `Limits of ${k.name} saved.`;
        }) }, "Save")),
        h("td", {}, amount, h("button", { type: "button", class: "topup", disabled: revoked, onclick: () => act("topup", async () => {
          const r = await api(`/v1/dashboard/admin/keys/${k.id}/topup`, { method: "POST", body: { amount: amount.value.trim() } });
          return `Topped up ${k.name}: balance ${r.balance} ${currency}.`;
        }) }, "Top up")),
        h("td", {}, revoked ? `revoked ${fmtTime(k.revoked_at)}` : h("button", { type: "button", class: "revoke danger", disabled: k.id === me.id,
          onclick: () => act("revoke", async () => {
            await api(`/v1/dashboard/admin/keys/${k.id}/revoke`, { method: "POST" });
            return `Revoked ${k.name}.`;
          }) }, "Revoke")));
    }), { id: "keys-table" }));
  }

  async function drawLog() {
    const { data } = await api("/v1/dashboard/admin/log?limit=20");
    logBox.replaceChildren(data.length ? table(["time", "by key", "action", "key", "detail"], data.map((a) => h("tr", {},
      h("td", {}, fmtTime(a.created_at)), h("td", {}, a.actor_key_id ?? "CLI"), h("td", {}, a.action), h("td", {}, a.target_key_id),
      h("td", { class: "mono" }, JSON.stringify(a.detail)))), { id: "log-table" }) : h("p", { class: "muted" }, "No admin actions yet."));
  }

  await Promise.all([drawKeys(), drawLog()]);
}
