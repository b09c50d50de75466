// Playground: chat with any model the key may use, streamed through the gateway's own request
// path (the session's key is charged, its quotas apply).
"use strict";

(() => {
  const { api, h, fmt, pageHead } = GF;

  // The text deltas of a stream of server-sent events, as they arrive.
  async function* deltas(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new GF.ApiError(500, chunk);
          yield chunk;
        }
      }
    }
  }

  GF.pages.playground = {
    title: "Playground",
    async render(root, args, ctx) {
      const { data } = await api("/v1/models", { signal: ctx.signal });
      const model = h("select", { id: "pg-model", "aria-label": "model" },
        data.map((m) => h("option", { value: m.id, selected: m.id === args[0], text: m.id })));
      const system = h("textarea", { id: "pg-system", rows: 4, placeholder: "Optional system prompt" });
      const maxTokens = h("input", { id: "pg-max-tokens", type: "number", min: 1, value: 256 });
      const temperature = h("input", { id: "pg-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0.7 });
      const empty = () => h("p", { class: "hint", text: "Pick a model and ask it something." });
      const messages = h("div", { class: "messages", id: "pg-messages" }, empty());
      const prompt = h("textarea", { id: "pg-prompt", rows: 2, placeholder: "Ask something… (Enter sends, Shift+Enter for a new line)" });
      const send = h("button", { type: "submit", class: "primary", id: "pg-send", text: "Send" });
      const stop = h("button", { type: "button", class: "hidden", id: "pg-stop", text: "Stop" });
      const history = [];
      let running = null;

      const clear = h("button", { type: "button", text: "New chat", onclick: () => {
        history.length = 0;
        GF.fill(messages, empty());
      } });

      function bubble(role, text) {
        const el = h("div", { class: `msg ${role}` }, text);
        messages.querySelector(".hint")?.remove();
        messages.append(el);
        messages.scrollTop = messages.scrollHeight;
        return el;
      }

      async function ask(event) {
        event.preventDefault();
        const text = prompt.value.trim();
        if (!text || running || !model.value) return;
        prompt.value = "";
        history.push({ role: "user", content: text });
        bubble("user", text);
        const answer = bubble("assistant typing", "");
        answer.dataset.state = "streaming";
        const body = {
          model: model.value,
          messages: [...(system.value.trim() ? [{ role: "system", content: system.value.trim() }] : []), ...history],
          stream: true,
          stream_options: { include_usage: true },
          max_tokens: Number(maxTokens.value) || undefined,
          temperature: Number(temperature.value),
        };
        running = new AbortController();
        send.disabled = true;
        stop.classList.remove("hidden");
        const started = performance.now();
        let first = null;
        let content = "";
        let usage = null;
        try {
          const resp = await api("/v1/chat/completions", { method: "POST", body, raw: true, signal: running.signal });
          for await (const chunk of deltas(resp)) {
            const piece = chunk.choices && chunk.choices[0] && chunk.choices[0].delta ? chunk.choices[0].delta.content : null;
            if (chunk.usage) usage = chunk.usage;
            if (!piece) continue;
            if (first === null) first = performance.now();
            content += piece;
            answer.textContent = content;
            messages.scrollTop = messages.scrollHeight;
          }
          history.push({ role: "assistant", content });
          const seconds = (performance.now() - started) / 1000;
          const tokens = usage ? usage.completion_tokens : null;
          answer.append(h("span", { class: "meta" },
            `${model.value} · first token ${first ? fmt.secs((first - started) / 1000) : "–"} · ${fmt.secs(seconds)}`,
            tokens ? ` · ${tokens} tokens · ${fmt.num(tokens / seconds, 1)} tok/s` : ""));
          answer.dataset.state = "done";
        } catch (error) {
          if (error.name === "AbortError") {
            answer.append(h("span", { class: "meta", text: "stopped" }));
            if (content) history.push({ role: "assistant", content });
          } else {
            answer.remove();
            bubble("error", error.message);
            history.pop();
          }
          answer.dataset.state = "done";
        } finally {
          answer.classList.remove("typing");
          running = null;
          send.disabled = false;
          stop.classList.add("hidden");
          prompt.focus();
        }
      }

      stop.addEventListener("click", () => running && running.abort());
      prompt.addEventListener("keydown", (e) => {
        if (e.key === "Enter" && !e.shiftKey) ask(e);
      });
      ctx.signal.addEventListener("abort", () => running && running.abort());

      GF.add(root, 
        pageHead("Playground", "Chat with any model your key may use; answers stream as the engine writes them.", clear),
        data.length ? null : h("div", { class: "notice", text: "No model is available to this key." }),
        h("div", { class: "playground" },
          h("div", { class: "panel" },
            h("div", { class: "field" }, h("label", { for: "pg-model", text: "Model" }), model),
            h("div", { class: "field" }, h("label", { for: "pg-system", text: "System prompt" }), system),
            h("div", { class: "row" },
              h("div", { class: "field" }, h("label", { for: "pg-max-tokens", text: "Max tokens" }), maxTokens),
              h("div", { class: "field" }, h("label", { for: "pg-temperature", text: "Temperature" }), temperature))),
          h("div", { class: "panel chat" }, messages,
            h("form", { class: "composer", onsubmit: ask }, prompt, h("div", { class: "actions" }, send, stop)))));
      prompt.focus();
    },
  };
})();
