// Playground: a streamed chat with the sampling knobs the API has, and each reply's usage and cost.
import { api, streamChat } from "./api.js";
import { errorBox, fmtInt, h } from "./dom.js";

const history = [];   // this tab's conversation, kept while the page is open

function usageLine(usage, billed, currency) {
  const parts = [
    `prompt ${fmtInt(usage.prompt_tokens)} (cache hit ${fmtInt(usage.prompt_cache_hit_tokens)}, miss ${fmtInt(usage.prompt_cache_miss_tokens)})`,
    `output ${fmtInt(usage.completion_tokens)}`,
    billed ? `cost ${billed.cost} ${currency}` : "cost –",
  ];
  return h("div", { class: "usage-line", dataset: { requestId: billed?.request_id || "" } }, parts.join(" · "));
}

export async function playgroundPage(root, { me, refreshAccount }) {
  const field = (label, input) => h("label", {}, label, input);
  const system = h("textarea", { id: "pg-system", rows: 2, placeholder: "You are a helpful assistant." });
  const temperature = h("input", { id: "pg-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0.7 });
  const topP = h("input", { id: "pg-top-p", type: "number", min: 0.05, max: 1, step: 0.05, value: 1 });
  const maxTokens = h("input", { id: "pg-max-tokens", type: "number", min: 1, step: 1, value: 64 });
  const jsonMode = h("input", { id: "pg-json", type: "checkbox", disabled: !me.features.json_mode });
  const message = h("textarea", { id: "pg-message", rows: 3, placeholder: "Say something…", required: true });
  const send = h("button", { id: "pg-send", type: "submit" }, "Send");
  const clear = h("button", { type: "button", class: "link", onclick: () => { history.length = 0; transcript.replaceChildren(); } }, "New chat");
  const transcript = h("div", { id: "pg-transcript", class: "transcript" });
  const status = h("p", { id: "pg-status", class: "muted" });

  const render = (m) => h("div", { class: `msg ${m.role}` }, h("div", { class: "role" }, m.role), h("div", { class: "content" }, m.content));
  for (const m of history) transcript.append(render(m));

  const form = h("form", { id: "pg-form", class: "card" },
    h("h1", {}, `Playground · ${me.model}`),
    field("System prompt", system),
    h("div", { class: "row" }, field("temperature", temperature), field("top_p", topP), field("max_tokens", maxTokens),
      field("JSON mode", h("span", { title: me.features.json_mode ? "" : "this server's API has no JSON mode yet" }, jsonMode))),
    transcript,
    field("Message", message),
    h("div", { class: "row" }, send, clear, status));
  root.append(form);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!message.value.trim()) return;
    const user = { role: "user", content: message.value };
    history.push(user);
    transcript.append(render(user));
    message.value = "";
    const reply = { role: "assistant", content: "" };
    const bubble = render(reply);
    bubble.classList.add("streaming");
    transcript.append(bubble);
    const content = bubble.querySelector(".content");
    const messages = [...(system.value.trim() ? [{ role: "system", content: system.value }] : []), ...history];
    const request = { model: me.model, messages, temperature: Number(temperature.value), top_p: Number(topP.value),
      max_tokens: Number(maxTokens.value) };
    if (jsonMode.checked) request.response_format = { type: "json_object" };
    send.disabled = true;
    status.textContent = "streaming…";
    let id = null, usage = null;
    try {
      for await (const chunk of streamChat(request)) {
        id = chunk.id;
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices) if (choice.delta?.content) {
          reply.content += choice.delta.content;
          content.textContent = reply.content;
        }
      }
      history.push(reply);
      const billed = await api(`/v1/dashboard/requests/${encodeURIComponent(id)}`).catch(() => null);
      bubble.append(usageLine(usage, billed, me.currency));
      status.textContent = "";
      await refreshAccount();
    } catch (e) {
      history.pop();
      bubble.append(errorBox(e));
      status.textContent = "";
    } finally {
      bubble.classList.remove("streaming");
      send.disabled = false;
    }
  });
}
