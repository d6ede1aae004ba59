// Talking to the server: the key lives in sessionStorage only, and goes out as the API expects it.
const KEY = "nanoseek.key";

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set(key) { sessionStorage.setItem(KEY, key); },
  clear() { sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(json) {
  const h = { Authorization: `Bearer ${session.key}` };
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function fail(response) {
  const data = await response.json().catch(() => null);
  return new ApiError(response.status, data?.error?.message || `${response.status} ${response.statusText}`);
}

export async function api(path, { method = "GET", body } = {}) {
  const response = await fetch(path, {
    method, headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await fail(response);
  return response.json();
}

// POST /v1/chat/completions with stream=true; yields each parsed SSE chunk until [DONE].
export async function* streamChat(request, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(true), signal,
    body: JSON.stringify({ ...request, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) throw await fail(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;  // ": keep-alive" comments
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.code || 500, chunk.error.message);
        yield chunk;
      }
    }
  }
}
