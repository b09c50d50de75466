// Models: status, replicas and where they run; for operators, one model's charts, events, log
// tail and actions (scale, delete, restart a replica) through the admin API.
"use strict";

(() => {
  const { api, h, fmt, session, toast, pageHead, phaseBadge, errorBox } = GF;

  function list(root, ctx) {
    const body = h("div", { class: "panel table-wrap" });
    GF.add(root, pageHead("Models",
      session.operator ? "Every model, how many replicas serve it, and where they run."
        : "The models your key may use.",
      session.operator ? h("a", { class: "button", href: "#/deploy", text: "Deploy a model" }) : null),
    body);

    async function draw() {
      const { models } = await api("/models", { signal: ctx.signal });
      if (!ctx.alive()) return;
      if (!models.length) {
        GF.fill(body, h("p", { class: "muted" }, "No models yet.",
          session.operator ? [" ", h("a", { href: "#/deploy", text: "Deploy one." })] : null));
        return;
      }
      const head = ["Model", "Status", "Ready", "Engine", "Context"];
      if (session.operator) head.push("Source", "Where");
      GF.fill(body, h("table", { id: "models-table" },
        h("thead", {}, h("tr", {}, head.map((t) => h("th", { class: ["Ready", "Context"].includes(t) ? "num" : "", text: t })))),
        h("tbody", {}, models.map((m) => h("tr", { dataset: { model: m.name } },
          h("td", {}, h("a", { href: `#/models/${encodeURIComponent(m.name)}`, text: m.name })),
          h("td", {}, phaseBadge(m.status), m.problem ? h("div", { class: "small muted", text: m.problem }) : null),
          h("td", { class: "num", text: `${m.ready} / ${m.desired}` }),
          h("td", { text: m.engine }),
          h("td", { class: "num", text: fmt.num(m.context_length) }),
          session.operator ? h("td", { class: "mono small", text: m.source }) : null,
          session.operator ? h("td", { class: "small" },
            [...new Set(m.replicas.flatMap((r) => r.where || []))].join(", ") || "–") : null)))));
    }
    return draw().then(() => ctx.every(4000, draw));
  }

  function startup(r) {
    if (r.phase === "Starting" && r.fetched_bytes !== null && r.fetched_bytes !== undefined && r.weights_bytes) {
      return `fetching ${fmt.pct(r.fetched_bytes / r.weights_bytes)} (${fmt.bytes(r.fetched_bytes)} of ${fmt.bytes(r.weights_bytes)})`;
    }
    const parts = [["fetch", r.fetch_s], ["load", r.load_s], ["ready", r.ready_s]]
      .filter(([, v]) => v !== null && v !== undefined)
      .map(([name, v]) => `${name} ${fmt.secs(v)}`);
    if (r.startup_s !== null && r.startup_s !== undefined) parts.push(`total ${fmt.secs(r.startup_s)}`);
    if (parts.length) return parts.join(" · ");
    if (r.started_at && r.ready_at) return `ready after ${fmt.secs(r.ready_at - r.started_at)}`;
    return "–";
  }

  async function act(what, fn, after) {
    try {
      await fn();
      toast(what);
      if (after) await after();
    } catch (error) {
      toast(error.message, "error");
    }
  }

  function actions(model, refresh) {
    const min = h("input", { type: "number", min: 0, value: model.replicas_min, "aria-label": "minimum replicas", name: "min" });
    const max = h("input", { type: "number", min: 1, value: model.replicas_max, "aria-label": "maximum replicas", name: "max" });
    const scale = h("form", { class: "scale-form", id: "scale-form", onsubmit: (e) => {
      e.preventDefault();
      act(`Scaling ${model.name} to ${min.value}–${max.value} replicas`, () => api(
        `/admin/v1/models/${encodeURIComponent(model.name)}/scale`,
        { method: "POST", body: { min: Number(min.value), max: Number(max.value) } }), refresh);
    } }, h("span", { class: "muted", text: "Replicas" }), min, "–", max,
    h("button", { type: "submit", text: "Scale" }));
    const remove = h("button", { class: "danger", id: "delete-model", text: "Delete", onclick: () => {
      if (!window.confirm(`Delete the model ${model.name}? Its replicas stop.`)) return;
      act(`Deleted ${model.name}`, () => api(`/admin/v1/models/${encodeURIComponent(model.name)}`,
        { method: "DELETE" }), () => { window.location.hash = "#/models"; });
    } });
    return h("div", { class: "actions", "data-needs": "operator" }, scale, remove);
  }

  function replicas(model, refresh) {
    if (!model.replicas.length) return h("p", { class: "muted", text: "No replicas run now." });
    if (!session.operator) {
      return h("table", {},
        h("thead", {}, h("tr", {}, h("th", { text: "Replica" }), h("th", { text: "Phase" }))),
        h("tbody", {}, model.replicas.map((r) => h("tr", {},
          h("td", { class: "mono", text: r.id }), h("td", {}, phaseBadge(r.phase))))));
    }
    return h("table", {},
      h("thead", {}, h("tr", {}, ["Replica", "Phase", "Gen", "Restarts", "Where", "Start-up", "Message", ""]
        .map((t) => h("th", { class: ["Gen", "Restarts"].includes(t) ? "num" : "", text: t })))),
      h("tbody", {}, model.replicas.map((r) => h("tr", {},
        h("td", { class: "mono", text: r.id }),
        h("td", {}, phaseBadge(r.phase)),
        h("td", { class: "num", text: r.generation ?? "" }),
        h("td", { class: "num", text: r.restarts ?? "" }),
        h("td", { class: "small", text: (r.where || []).join(", ") || "–" }),
        h("td", { class: "small", text: startup(r) }),
        h("td", { class: "small muted", text: r.message || "" }),
        h("td", {}, h("button", { class: "small", "data-needs": "operator",
          text: "Restart", onclick: () => act(`Restarting ${r.id}`, () => api(
            `/admin/v1/replicas/${encodeURIComponent(r.id)}/restart`, { method: "POST" }), refresh) }))))));
  }

  async function charts(box, name, since, ctx) {
    const data = await api(`/admin/v1/models/${encodeURIComponent(name)}/latency?since=${since}`,
      { signal: ctx.signal });
    if (!ctx.alive()) return;
    const x = data.series.map((p) => Date.parse(p.start) / 1000);
    const col = (k) => data.series.map((p) => p[k]);
    const s = data.summary;
    const latency = h("div", {});
    const throughput = h("div", {});
    GF.fill(box, 
      h("div", { class: "cards" },
        GF.card("Requests", fmt.num(s.requests), `last ${since}`),
        GF.card("TTFT p50 / p95", `${fmt.ms(s.ttft_ms_p50)}`, `p95 ${fmt.ms(s.ttft_ms_p95)} · p99 ${fmt.ms(s.ttft_ms_p99)}`),
        GF.card("Inter-token p50", fmt.ms(s.itl_ms_p50), `p95 ${fmt.ms(s.itl_ms_p95)}`),
        GF.card("End-to-end p50", fmt.ms(s.e2e_ms_p50), `p95 ${fmt.ms(s.e2e_ms_p95)} · p99 ${fmt.ms(s.e2e_ms_p99)}`),
        GF.card("Tokens/s", fmt.num(s.tokens_per_s, 1),
          s.tokens_per_s_per_gpu !== null ? `${fmt.num(s.tokens_per_s_per_gpu, 1)} per GPU` : "on CPU")),
      h("div", { class: "grid2" },
        h("div", {}, h("h3", { text: "Latency" }), latency),
        h("div", {}, h("h3", { text: "Throughput" }), throughput)));
    GF.chart(latency, { x, unit: "ms", series: [
      { label: "TTFT p50", values: col("ttft_ms_p50") }, { label: "TTFT p95", values: col("ttft_ms_p95") },
      { label: "E2E p50", values: col("e2e_ms_p50") }, { label: "E2E p95", values: col("e2e_ms_p95") }] });
    GF.chart(throughput, { x, unit: "tok/s", series: [{ label: "tokens/s", values: col("tokens_per_s") }] });
    await gpuHistory(box, name, since, ctx);
  }

  // The GPUs the model's replicas held over the window (the telemetry's history in the store):
  // memory summed and utilisation averaged over its devices at each sample. Nothing on CPU.
  async function gpuHistory(box, name, since, ctx) {
    const history = await api(`/admin/v1/gpus/history?model=${encodeURIComponent(name)}&since=${since}`,
      { signal: ctx.signal }).catch(() => null);
    if (!ctx.alive() || !history || !history.points.length) return;
    const at = new Map();
    for (const p of history.points) {
      const row = at.get(p.at) || { memory: 0, util: 0, n: 0, devices: 0 };
      row.memory += p.memory_used || 0;
      const busy = p.util ?? p.sm_active;
      if (busy !== null && busy !== undefined) { row.util += busy; row.n += 1; }
      row.devices += 1;
      at.set(p.at, row);
    }
    const x = [...at.keys()].sort((a, b) => a - b);
    const memory = h("div", {});
    const util = h("div", {});
    box.append(h("div", { class: "grid2", style: { marginTop: "14px" } },
      h("div", {}, h("h3", { text: "GPU memory used" }), memory),
      h("div", {}, h("h3", { text: "GPU utilisation" }), util)));
    GF.chart(memory, { x, format: (v) => fmt.bytes(v), series: [{ label: "memory", values: x.map((t) => at.get(t).memory) }] });
    GF.chart(util, { x, format: (v) => fmt.pct(v), series: [{ label: "mean utilisation",
      values: x.map((t) => (at.get(t).n ? at.get(t).util / at.get(t).n : null)) }] });
  }

  function events(rows) {
    if (!rows.length) return h("p", { class: "muted", text: "No events." });
    return h("table", {}, h("tbody", {}, rows.slice(-50).reverse().map((e) => h("tr", {},
      h("td", { class: "small muted", text: fmt.when(e.at) }),
      h("td", {}, h("span", { class: `badge ${e.type === "Warning" ? "warn" : ""}`, text: e.reason })),
      h("td", { class: "small", text: e.message })))));
  }

  async function detail(root, name, ctx) {
    const head = h("div", {});
    const summary = h("div", { class: "panel" });
    const perf = h("div", { class: "panel" });
    const lower = h("div", { class: "grid2" });
    GF.add(root, head, summary);
    if (session.operator) GF.add(root, perf, lower);
    let since = "1h";

    async function refresh() {
      const { models } = await api("/models", { signal: ctx.signal });
      const model = models.find((m) => m.name === name);
      if (!ctx.alive()) return;
      if (!model) {
        GF.fill(head, errorBox(new Error(`The model ${name} does not exist (or your key may not use it).`)));
        summary.remove();
        return;
      }
      GF.fill(head, pageHead(model.name, [model.engine, model.source].filter(Boolean).join(" · "),
        phaseBadge(model.status), session.operator ? actions(model, refresh) : null,
        h("a", { class: "button", href: `#/playground/${encodeURIComponent(model.name)}`, text: "Try it" })));
      GF.fill(summary, 
        h("dl", { class: "kv" },
          h("dt", { text: "Ready / wanted" }), h("dd", { text: `${model.ready} / ${model.desired}` }),
          h("dt", { text: "Replicas" }), h("dd", { text: `min ${model.replicas_min}, max ${model.replicas_max}` }),
          h("dt", { text: "Context" }), h("dd", { text: `${fmt.num(model.context_length)} tokens` }),
          h("dt", { text: "GPUs per replica" }), h("dd", { text: model.gpus || "none (CPU)" }),
          model.schedule ? [h("dt", { text: "Schedule" }), h("dd", { text: model.schedule.join(", ") })] : null,
          model.problem ? [h("dt", { text: "Problem" }), h("dd", { class: "fits-no", text: model.problem })] : null,
          model.rollout ? [h("dt", { text: "Rollout" }), h("dd", { text: model.rollout })] : null),
        h("h3", { style: { marginTop: "14px" }, text: "Replicas" }), replicas(model, refresh));
    }
    await refresh();
    ctx.every(3000, refresh);
    if (!session.operator) return;

    const window_ = h("select", { "aria-label": "window", onchange: (e) => {
      since = e.target.value;
      charts(chartBox, name, since, ctx).catch((err) => GF.fill(chartBox, errorBox(err)));
    } }, ["15m", "1h", "6h", "24h", "7d"].map((w) => h("option", { value: w, selected: w === since, text: `last ${w}` })));
    const chartBox = h("div", {});
    perf.append(h("div", { class: "page-head" }, h("h2", { text: "Latency and throughput" }), window_), chartBox);
    charts(chartBox, name, since, ctx).catch((err) => GF.fill(chartBox, errorBox(err)));
    ctx.every(10000, () => charts(chartBox, name, since, ctx));

    const eventBox = h("div", { class: "table-wrap" });
    const logBox = h("pre", { class: "logs", id: "logs", text: "…" });
    const follow = h("input", { type: "checkbox", checked: true });
    lower.append(
      h("div", { class: "panel" }, h("h2", { text: "Events" }), eventBox),
      h("div", { class: "panel" }, h("div", { class: "page-head" }, h("h2", { text: "Log tail" }),
        h("label", { class: "small" }, follow, " follow")), logBox));
    async function tail() {
      const [ev, logs] = await Promise.all([
        api(`/admin/v1/events?model=${encodeURIComponent(name)}`, { signal: ctx.signal }),
        api(`/admin/v1/models/${encodeURIComponent(name)}/logs?tail=200`, { signal: ctx.signal }),
      ]);
      if (!ctx.alive()) return;
      GF.fill(eventBox, events(ev.events));
      if (follow.checked) {
        logBox.textContent = typeof logs === "string" ? logs : JSON.stringify(logs);
        logBox.scrollTop = logBox.scrollHeight;
      }
    }
    await tail().catch((err) => { logBox.textContent = err.message; });
    ctx.every(2000, tail);
  }

  GF.pages.models = {
    title: "Models",
    render(root, args, ctx) {
      return args[0] ? detail(root, args[0], ctx) : list(root, ctx);
    },
  };
})();
