// The console's shell: sign-in, the header, and a hash router over the pages.
import { ApiError, api, session } from "./api.js";
import { errorBox, h } from "./dom.js";
import { adminPage } from "./admin.js";
import { billingPage } from "./billing.js";
import { playgroundPage } from "./playground.js";
import { serverPage } from "./server.js";
import { usagePage } from "./usage.js";

const PAGES = { playground: playgroundPage, usage: usagePage, billing: billingPage, admin: adminPage, server: serverPage };
const view = document.getElementById("view");
let me = null;          // GET /v1/dashboard/me of the signed-in key
let leave = null;       // the current page's cleanup (timers)

export async function refreshAccount() {
  me = await api("/v1/dashboard/me");
  document.getElementById("key-name").textContent = `${me.name} (${me.prefix}…)`;
  document.getElementById("balance").textContent = me.available;
  document.getElementById("currency").textContent = me.currency;
  document.getElementById("nav-admin").hidden = !me.admin;
  return me;
}

function showSignIn(message) {
  document.getElementById("nav").hidden = true;
  document.getElementById("account").hidden = true;
  const form = document.getElementById("sign-in-template").content.cloneNode(true);
  view.replaceChildren(form);
  const error = document.getElementById("sign-in-error");
  if (message) { error.textContent = message; error.hidden = false; }
  document.getElementById("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("key-input");
    session.set(input.value.trim());
    input.value = "";
    try {
      await refreshAccount();
    } catch (e) {
      session.clear();
      error.textContent = e.status === 401 ? `That key was not accepted: ${e.message}` : e.message;
      error.hidden = false;
      return;
    }
    if (!location.hash || location.hash === "#/") location.hash = "#/playground";
    else route();
  });
}

async function route() {
  if (leave) { leave(); leave = null; }
  if (!session.key) { showSignIn(); return; }
  try {
    if (!me) await refreshAccount();
  } catch (e) {
    session.clear(); me = null;
    showSignIn(e instanceof ApiError && e.status === 401 ? "Your key is no longer accepted; sign in again." : e.message);
    return;
  }
  document.getElementById("nav").hidden = false;
  document.getElementById("account").hidden = false;
  const name = (location.hash.replace(/^#\/?/, "") || "playground").split("?")[0];
  const page = PAGES[name] || playgroundPage;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.getAttribute("href") === `#/${name}`);
  const container = h("section", { id: `page-${name}` });
  view.replaceChildren(container);
  try {
    leave = (await page(container, { me, refreshAccount })) || null;
  } catch (e) {
    container.append(errorBox(e));
  }
}

document.getElementById("sign-out").addEventListener("click", () => {
  session.clear(); me = null; location.hash = "";
  route();
});
window.addEventListener("hashchange", route);
route();
