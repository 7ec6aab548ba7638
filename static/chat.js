// The chat playground (templates/chat.html): one conversation per side (adapter, base model), each answer streamed
// from the OpenAI-compatible POST /v1/chat/completions (Server-Sent Events read from fetch, since EventSource
// cannot POST). page.js adds the CSRF header to same-origin fetch calls.
(() => {
  const card = document.querySelector(".chat-playground");
  if (!card) return;
  const form = card.querySelector("#chat-form");
  const sides = {
    adapter: { model: card.dataset.adapterModel, history: [] },
    base: { model: card.dataset.baseModel, history: [] },
  };
  let busy = false;

  function bubble(side, role, text) {
    const item = document.createElement("li");
    item.className = `chat-turn chat-${role}`;
    item.dataset.role = role;
    const who = document.createElement("span");
    who.className = "chat-role";
    who.textContent = role === "user" ? "you" : role;
    const body = document.createElement("div");
    body.className = "chat-text";
    body.textContent = text;
    item.append(who, body);
    card.querySelector(`[data-log="${side}"]`).appendChild(item);
    return body;
  }

  // Reads an OpenAI-style SSE body: "data: {...}" lines, ending with "data: [DONE]".
  async function stream(side, messages, settings) {
    const status = card.querySelector(`[data-status="${side}"]`);
    const output = bubble(side, "assistant", "");
    output.parentElement.dataset.testid = `chat-answer-${side}`;
    status.textContent = "waiting…";
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({ model: sides[side].model, messages, stream: true, ...settings }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      const detail = (body.error && body.error.message) || body.detail || response.statusText;
      status.textContent = `failed: ${detail}`;
      output.parentElement.dataset.done = "true";
      return null;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", text = "", finish = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).trim();
        buffer = buffer.slice(newline + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) {
          text += choice.delta.content;
          output.textContent = text;
          status.textContent = "generating…";
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    status.textContent = finish ? `stopped: ${finish}` : "";
    output.parentElement.dataset.done = "true";
    return text;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (busy) return;
    const data = new FormData(form);
    const message = String(data.get("message") || "").trim();
    if (!message) return;
    busy = true;
    form.querySelector('[data-testid="chat-send"]').disabled = true;
    const system = String(data.get("system") || "").trim();
    const settings = {
      temperature: Number(data.get("temperature")),
      top_p: Number(data.get("top_p")),
      max_tokens: Number(data.get("max_tokens")),
    };
    form.querySelector("#chat-message").value = "";
    try {
      for (const side of ["adapter", "base"]) {
        sides[side].history.push({ role: "user", content: message });
        bubble(side, "user", message);
        const messages = (system ? [{ role: "system", content: system }] : []).concat(sides[side].history);
        const answer = await stream(side, messages, settings).catch((error) => {
          card.querySelector(`[data-status="${side}"]`).textContent = `failed: ${error}`;
          return null;
        });
        // A failed turn leaves the history as it was, so the next message is not answered out of context.
        if (answer === null) sides[side].history.pop();
        else sides[side].history.push({ role: "assistant", content: answer });
      }
    } finally {
      busy = false;
      form.querySelector('[data-testid="chat-send"]').disabled = false;
    }
  });

  form.querySelector("[data-chat-reset]").addEventListener("click", () => {
    for (const side of Object.keys(sides)) {
      sides[side].history = [];
      card.querySelector(`[data-log="${side}"]`).replaceChildren();
      card.querySelector(`[data-status="${side}"]`).textContent = "";
    }
  });
})();
