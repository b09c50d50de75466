// Tenants & usage: cost per tenant and model over a window (idle time counted; a model priced
// per token costs what its requests cost), over time, what went to endpoints outside the
// company, and for admins each tenant's quotas and how close it is to them.
"use strict";

(() => {
  const { api, h, fmt, card, bar, session, pageHead, errorBox } = GF;
  const WINDOWS = { "24h": [24 * 3600, 12], "7d": [7 * 86400, 7], "30d": [30 * 86400, 10] };

  function costTable(report, by) {
    const lines = report.lines;
    if (!lines.length) return h("p", { class: "muted", text: "Nothing used or placed in this window." });
    const placed = lines.some((l) => l.placed_cost !== undefined);
    const head = [by === "tenant" ? "Tenant" : "Model", "Requests", "OK", "Tokens", "GPU-s"];
    if (placed) head.push("Placed");
    head.push("Busy", "Idle share", "Total", "Per OK request", "Per 1M tokens");
    return h("table", { id: `cost-by-${by}` },
      h("thead", {}, h("tr", {}, head.map((t, i) => h("th", { class: i ? "num" : "", text: t })))),
      h("tbody", {}, lines.map((l) => h("tr", {},
        h("td", {}, by === "model" ? h("a", { href: `#/models/${encodeURIComponent(l.model)}`, text: l.model }) : l[by]),
        h("td", { class: "num", text: fmt.num(l.requests) }),
        h("td", { class: "num", text: fmt.num(l.successful) }),
        h("td", { class: "num", text: fmt.num(l.prompt_tokens + l.completion_tokens) }),
        h("td", { class: "num", text: l.priced === "per_token" ? "—" : fmt.num(l.gpu_seconds, 1) }),
        placed ? h("td", { class: "num", text: l.priced === "per_token" ? "per token" : fmt.usd(l.placed_cost) }) : null,
        h("td", { class: "num", text: fmt.usd(l.busy_cost) }),
        h("td", { class: "num", text: fmt.usd(l.idle_cost) }),
        h("td", { class: "num", text: fmt.usd(l.total_cost) }),
        h("td", { class: "num", text: fmt.usd(l.cost_per_successful_request) }),
        h("td", { class: "num", text: fmt.usd(l.cost_per_million_tokens) })))));
  }

  // Requests sent to endpoints outside the company (part of the totals), per tenant; and how
  // many requests' token counts are the gateway's estimates (the engine reported no usage).
  function externalPanel(rows) {
    const sent = rows.filter((r) => r.external_requests);
    const estimated = rows.reduce((n, r) => n + (r.estimated_requests || 0), 0);
    if (!sent.length && !estimated) return null;
    return h("div", { class: "panel table-wrap", id: "external-usage" },
      h("h2", { text: "External endpoints" }),
      h("p", { class: "muted small", text: "Requests sent to endpoints outside the company (included in the totals above)." }),
      sent.length ? h("table", {},
        h("thead", {}, h("tr", {}, ["Tenant", "Requests", "Tokens", "Cost"]
          .map((t, i) => h("th", { class: i ? "num" : "", text: t })))),
        h("tbody", {}, sent.map((r) => h("tr", {},
          h("td", { text: r.tenant }),
          h("td", { class: "num", text: fmt.num(r.external_requests) }),
          h("td", { class: "num", text: fmt.num(r.external_prompt_tokens + r.external_completion_tokens) }),
          h("td", { class: "num", text: fmt.usd(r.external_cost_usd) })))))
        : h("p", { class: "muted", text: "None in this window." }),
      estimated ? h("p", { class: "notice", id: "estimated-usage",
        text: `${fmt.num(estimated)} request(s) have estimated token counts: their engine reported no usage.` }) : null);
  }

  async function overTime(box, span, buckets, ctx) {
    const now = Date.now() / 1000;
    const step = span / buckets;
    const edges = Array.from({ length: buckets }, (_, i) => now - span + i * step);
    const iso = (t) => new Date(t * 1000).toISOString();
    const reports = await Promise.all(edges.map((start) => api(
      `/admin/v1/report?by=tenant&since=${encodeURIComponent(iso(start))}&until=${encodeURIComponent(iso(start + step))}`,
      { signal: ctx.signal })));
    if (!ctx.alive()) return;
    const tenants = [...new Set(reports.flatMap((r) => r.lines.map((l) => l.tenant)))].sort();
    const series = (key) => tenants.map((t) => ({
      label: t,
      values: reports.map((r) => (r.lines.find((l) => l.tenant === t) || {})[key] ?? 0),
    }));
    const cost = h("div", {});
    const requests = h("div", {});
    GF.fill(box, h("div", { class: "grid2" },
      h("div", {}, h("h3", { text: "Cost per tenant" }), cost),
      h("div", {}, h("h3", { text: "Requests per tenant" }), requests)));
    GF.chart(cost, { x: edges.map((t) => t + step / 2), format: (v) => fmt.usd(v), series: series("total_cost") });
    GF.chart(requests, { x: edges.map((t) => t + step / 2), series: series("requests") });
  }

  function meter(label, used, limit, money = false) {
    const show = (v) => (money ? fmt.usd(v) : fmt.num(v, 2));
    if (limit === null || limit === undefined) {
      return h("tr", {}, h("td", { text: label }), h("td", { class: "muted", colspan: 2, text: `${show(used)} · no limit` }));
    }
    const f = limit ? used / limit : 0;
    const cls = f >= 1 ? "used full" : f >= 0.8 ? "used hot" : "used";
    return h("tr", {}, h("td", { text: label }),
      h("td", { style: { width: "55%" } }, h("div", { class: "meter" }, h("div", { class: "bar" }, bar(f, cls)))),
      h("td", { class: "num", text: `${show(used)} / ${show(limit)} (${fmt.pct(f)})` }));
  }

  async function quotas(box, ctx) {
    const { tenants } = await api("/admin/v1/tenants", { signal: ctx.signal });
    const rows = await Promise.all(tenants.map((t) => api(
      `/admin/v1/tenants/${encodeURIComponent(t.name)}/quota`, { signal: ctx.signal })
      .catch((error) => ({ tenant: t.name, error }))));
    if (!ctx.alive()) return;
    GF.fill(box, ...rows.map((q) => {
      if (q.error) return h("div", { class: "panel" }, h("h3", { text: q.tenant }), errorBox(q.error));
      const l = q.limits || {};
      const u = q.used || {};
      return h("div", { class: "panel", dataset: { tenant: q.tenant } },
        h("h3", { text: q.tenant }),
        h("table", {}, h("tbody", {},
          meter("Requests / min", u.rpm || 0, l.requestsPerMinute),
          meter("Tokens / min", u.tpm || 0, l.tokensPerMinute),
          meter("Concurrent requests", u.concurrency || 0, l.concurrency),
          meter(`Budget (${l.budget ? l.budget.period : "month"})`, (u.spent_usd || 0) + (u.reserved_usd || 0),
            l.budget ? l.budget.usd : null, true))));
    }));
  }

  GF.pages.usage = {
    title: "Tenants & usage",
    needs: "operator",
    async render(root, _args, ctx) {
      let since = "7d";
      const picker = h("select", { "aria-label": "window", onchange: (e) => { since = e.target.value; draw(); } },
        Object.keys(WINDOWS).map((w) => h("option", { value: w, selected: w === since, text: `last ${w}` })));
      const head = pageHead("Tenants & usage", "What each tenant and model used and cost, idle time included.", picker);
      const cards = h("div", {});
      const time = h("div", { class: "panel" });
      const byTenant = h("div", { class: "panel table-wrap" });
      const byModel = h("div", { class: "panel table-wrap" });
      const refused = h("div", {});
      const external = h("div", {});
      const quota = h("div", {});
      GF.add(root, head, cards, time, byTenant, external, refused, byModel);
      if (session.admin) GF.add(root, h("h2", { text: "Quotas" }), quota);

      async function draw() {
        const [tenants, models, usage] = await Promise.all([
          api(`/admin/v1/report?by=tenant&since=${since}`, { signal: ctx.signal }),
          api(`/admin/v1/report?by=model&since=${since}`, { signal: ctx.signal }),
          api(`/admin/v1/usage?by=tenant&since=${since}`, { signal: ctx.signal }),
        ]);
        if (!ctx.alive()) return;
        const f = tenants.fleet;
        GF.fill(cards, 
          h("div", { class: "cards" },
            card("Total cost", fmt.usd(f.total_cost), `last ${since}`),
            card("Fleet idle", fmt.usd(f.idle_cost), f.gpus ? `${f.gpus} GPUs, charged to nobody` : "no GPUs"),
            card("Per OK request", fmt.usd(f.cost_per_successful_request), `${fmt.num(f.successful)} successful`),
            card("Per 1M tokens", fmt.usd(f.cost_per_million_tokens), `${fmt.num(f.tokens)} tokens`)),
          ...tenants.notes.map((n) => h("div", { class: "notice cpu", text: n })));
        GF.fill(refused, usage.refusals.length ? h("div", { class: "panel table-wrap" },
          h("h2", { text: "Refused requests" }),
          h("p", { class: "muted small", text: "Requests turned away before an engine had them (whole days)." }),
          h("table", {}, h("thead", {}, h("tr", {}, ["Tenant", "Status", "Reason", "Refused"]
            .map((t, i) => h("th", { class: i === 3 ? "num" : "", text: t })))),
          h("tbody", {}, usage.refusals.map((r) => h("tr", {},
            h("td", { text: r.tenant }), h("td", { text: r.status }), h("td", { class: "mono small", text: r.reason }),
            h("td", { class: "num", text: fmt.num(r.refused) })))))) : null);
        GF.fill(byTenant, h("h2", { text: "By tenant" }), costTable(tenants, "tenant"));
        GF.fill(external, externalPanel(usage.usage));
        GF.fill(byModel, h("h2", { text: "By model" }), costTable(models, "model"),
          models.unattributed.length ? h("p", { class: "muted small" }, "Idle cost of models nobody used: ",
            models.unattributed.map((u) => `${u.model} ${fmt.usd(u.idle_cost)}`).join(", ")) : null);
        const [span, buckets] = WINDOWS[since];
        GF.fill(time, h("p", { class: "muted", text: "Loading the history…" }));
        overTime(time, span, buckets, ctx).catch((e) => GF.fill(time, errorBox(e)));
      }
      await draw();
      if (session.admin) {
        await quotas(quota, ctx).catch((e) => GF.fill(quota, errorBox(e)));
        ctx.every(5000, () => quotas(quota, ctx));
      }
    },
  };
})();
