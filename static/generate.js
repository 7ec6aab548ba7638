// The causal-LM try-out card (templates/_generate.html): both answers streamed side by side over SSE.
(() => {
  const card = document.querySelector(".lm-tryout");
  if (!card) return;
  const form = card.querySelector("#generate-form");
  const sources = [];
  function run(side, useAdapter) {
    const output = card.querySelector(`[data-output="${side}"]`);
    const status = card.querySelector(`[data-status="${side}"]`);
    output.textContent = "";
    status.textContent = "waiting…";
    const data = new FormData(form);
    const params = new URLSearchParams({
      prompt: data.get("prompt"), temperature: data.get("temperature"), top_p: data.get("top_p"),
      max_new_tokens: data.get("max_new_tokens"), use_adapter: useAdapter ? "true" : "false",
    });
    const source = new EventSource(`/api/v1/adapters/${card.dataset.adapterId}/generate/stream?${params}`);
    sources.push(source);
    source.addEventListener("token", (event) => {
      status.textContent = "generating…";
      output.textContent += JSON.parse(event.data).text;
    });
    source.addEventListener("done", (event) => {
      const result = JSON.parse(event.data);
      status.textContent = `${result.token_ids.length} tokens, stopped at ${result.finish_reason}`;
      output.dataset.done = "true";
      source.close();
    });
    source.addEventListener("error", (event) => {
      status.textContent = event.data ? `failed: ${JSON.parse(event.data).detail}` : "connection lost";
      source.close();
    });
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    while (sources.length) sources.pop().close();
    card.querySelectorAll("[data-output]").forEach((el) => delete el.dataset.done);
    run("adapter", true);
    run("base", false);
  });
})();
