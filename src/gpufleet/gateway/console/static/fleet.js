// Fleet: nodes → GPUs → MIG slices or time-slices, each with what holds it; idle ones stand out.
"use strict";

(() => {
  const { api, h, fmt, card, bar, pageHead, phaseBadge } = GF;

  function memory(device) {
    const total = device.memory_total;
    const used = device.memory_used;
    const planned = device.memory_planned;
    const of = total || Math.max(used || 0, planned || 0) || 1;
    return [
      h("div", { class: "bar", title: "used (solid) and planned (striped) memory" },
        planned ? bar(planned / of, "planned") : null,
        used !== null && used !== undefined ? bar(used / of, "used") : null),
      h("div", { class: "bar-label" },
        h("span", {}, `mem ${used !== null && used !== undefined ? fmt.bytes(used) : "–"}`,
          planned ? ` · plan ${fmt.bytes(planned)}` : ""),
        h("span", { text: total ? fmt.bytes(total) : "" })),
    ];
  }

  function utilisation(device) {
    if (device.util === null || device.util === undefined) return null;
    return [
      h("div", { class: "bar" }, bar(device.util, "used util")),
      h("div", { class: "bar-label" },
        h("span", { text: `util ${fmt.pct(device.util)}` }),
        h("span", {}, device.power_w ? `${Math.round(device.power_w)} W` : "",
          device.temp_c ? ` · ${Math.round(device.temp_c)} °C` : "")),
    ];
  }

  function holders(list) {
    if (!list.length) return h("span", { class: "badge idle", text: "idle" });
    return list.map((holder) => h("a", {
      class: `chip ${holder.planned ? "planned" : ""}`,
      href: `#/models/${encodeURIComponent(holder.model)}`,
      title: holder.replica ? `replica ${holder.replica}${holder.planned ? " (planned)" : ""}`
        : "planned by the planner",
    }, holder.model));
  }

  function slice(piece) {
    return h("div", { class: `slice ${piece.idle ? "idle" : ""}` },
      h("div", { class: "slice-head" },
        h("span", { class: "mono", text: `MIG ${piece.profile || ""}` }),
        h("span", {}, holders(piece.holders))),
      memory(piece), utilisation(piece));
  }

  function slots(gpu) {
    const taken = gpu.holders.filter((x) => x.slot !== null && x.slot !== undefined);
    const loose = gpu.holders.filter((x) => x.slot === null || x.slot === undefined);
    const cells = [];
    for (let i = 0; i < gpu.slots; i += 1) {
      const holder = taken.find((x) => x.slot === i) || (i === 0 ? loose[0] : null);
      cells.push(h("div", { class: `slot ${holder ? "taken" : ""}` },
        `slice ${i}: `, holder ? holder.model : "free"));
    }
    return h("div", { class: "slots" }, cells);
  }

  function tile(gpu) {
    const mig = gpu.slices.length > 0;
    const idleSlices = gpu.slices.filter((s) => s.idle).length;
    return h("div", { class: `gpu ${gpu.idle ? "idle" : ""}`, dataset: { idle: String(gpu.idle) } },
      h("div", { class: "gpu-head" },
        h("span", { class: "name" }, `GPU ${gpu.index} `,
          h("span", { class: "muted", text: gpu.type || gpu.name || "" })),
        gpu.idle ? h("span", { class: "badge idle", text: "idle" })
          : mig ? h("span", { class: "badge info", text: `MIG · ${idleSlices}/${gpu.slices.length} idle` })
            : gpu.mode === "time-sliced" ? h("span", { class: "badge info", text: `${gpu.slots} time-slices` })
              : null),
      memory(gpu),
      utilisation(gpu),
      mig ? h("div", { class: "slices" }, gpu.slices.map(slice))
        : gpu.mode === "time-sliced" ? slots(gpu)
          : h("div", { class: "holders" }, gpu.idle ? h("span", { class: "muted small", text: "nothing placed" }) : holders(gpu.holders)));
  }

  function node(n, idleOnly, query) {
    let gpus = n.gpus;
    if (idleOnly) gpus = gpus.filter((g) => g.idle || g.slices.some((s) => s.idle));
    if (query) {
      const q = query.toLowerCase();
      const hit = (g) => [...g.holders, ...g.slices.flatMap((s) => s.holders)]
        .some((x) => x.model.toLowerCase().includes(q));
      if (!n.name.toLowerCase().includes(q)) gpus = gpus.filter(hit);
    }
    if (!gpus.length) return null;
    return h("section", { class: "node" },
      h("div", { class: "node-head" },
        h("h3", { text: n.name }),
        h("span", { class: "muted small" },
          `${n.gpus.length} GPU${n.gpus.length === 1 ? "" : "s"}`,
          n.cpus ? ` · ${n.cpus} CPUs` : "", n.memory ? ` · ${fmt.bytes(n.memory)} RAM` : "",
          n.idle ? " · " : "", n.idle ? h("span", { class: "badge idle", text: `${n.idle} idle` }) : null)),
      h("div", { class: "gpus" }, gpus.map(tile)));
  }

  function replicaTable(rows, title, note) {
    return h("div", { class: "panel" },
      h("h2", { text: title }), note ? h("p", { class: "muted", text: note }) : null,
      rows.length ? h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, ["Replica", "Model", "Phase", "PID", "Restarts", "Message"]
          .map((t) => h("th", { class: ["PID", "Restarts"].includes(t) ? "num" : "", text: t })))),
        h("tbody", {}, rows.map((r) => h("tr", {},
          h("td", { class: "mono", text: r.id }),
          h("td", {}, h("a", { href: `#/models/${encodeURIComponent(r.model)}`, text: r.model })),
          h("td", {}, phaseBadge(r.phase)),
          h("td", { class: "num", text: r.pid ?? "–" }),
          h("td", { class: "num", text: r.restarts }),
          h("td", { class: "muted", text: r.message || "" }))))))
        : h("p", { class: "muted", text: "No replicas run." }));
  }

  function summary(view) {
    const s = view.summary;
    const cards = [card("Nodes", fmt.num(s.nodes))];
    if (view.gpus) {
      cards.push(card("GPUs", fmt.num(s.gpus), s.mig_slices ? `${s.mig_slices} MIG slices` : ""));
      cards.push(card("Idle", fmt.num(s.idle), `of ${fmt.num(s.devices)} devices`, s.idle ? "idle" : ""));
      cards.push(card("GPU memory", s.memory_total ? fmt.pct(s.memory_used / s.memory_total) : "–",
        `${fmt.bytes(s.memory_used)} of ${fmt.bytes(s.memory_total)}`));
      cards.push(card("Utilisation", fmt.pct(s.util), view.telemetry ? "mean of GPUs now" : "no telemetry"));
    }
    cards.push(card("Models", fmt.num(s.models)));
    cards.push(card("Replicas", `${fmt.num(s.ready)} / ${fmt.num(s.replicas)}`, "ready / all"));
    return h("div", { class: "cards" }, cards);
  }

  GF.pages.fleet = {
    title: "Fleet",
    needs: "operator",
    async render(root, _args, ctx) {
      const state = { idleOnly: false, query: "" };
      const body = h("div", {});
      const search = h("input", { type: "search", placeholder: "Filter by node or model", "aria-label": "Filter",
        oninput: (e) => { state.query = e.target.value.trim(); draw(); } });
      const idle = h("label", { class: "small" },
        h("input", { type: "checkbox", onchange: (e) => { state.idleOnly = e.target.checked; draw(); } }),
        " idle only");
      GF.add(root, pageHead("Fleet", "Every node, GPU and MIG slice, what it holds, and what sits idle.",
        search, idle), body);
      let view = await api("/fleet", { signal: ctx.signal });

      function draw() {
        const parts = [summary(view)];
        search.classList.toggle("hidden", !view.gpus);
        idle.classList.toggle("hidden", !view.gpus);
        if (view.message) {
          const cpu = view.cpu_nodes.map((n) => `${n.name}: ${n.cpus} CPUs, ${fmt.bytes(n.memory)} memory`);
          parts.push(h("div", { class: "notice cpu", id: "no-gpus" },
            h("strong", { text: view.message }),
            view.gpus ? null : h("span", { class: "muted" },
              cpu.length ? `Models run as CPU replicas on ${cpu.join("; ")}.` : "")));
          parts.push(replicaTable(view.elsewhere, view.cpu_nodes.length ? "CPU replicas" : "Replicas"));
        } else {
          parts.push(h("div", { class: "legend" },
            h("span", {}, h("span", { class: "swatch used" }), "memory used"),
            h("span", {}, h("span", { class: "swatch planned" }), "planned"),
            h("span", {}, h("span", { class: "swatch idle" }), "idle: nothing placed or running"),
            view.telemetry ? null : h("span", { text: "· no GPU telemetry: planned figures only" })));
          const nodes = view.nodes.map((n) => node(n, state.idleOnly, state.query)).filter(Boolean);
          parts.push(h("div", { style: { marginTop: "12px" } },
            nodes.length ? nodes : h("p", { class: "muted", text: "No GPU matches." })));
          if (view.elsewhere.length) {
            parts.push(replicaTable(view.elsewhere, "Replicas on no GPU",
              "CPU replicas, and replicas whose GPU is not known yet (starting, or no telemetry)."));
          }
        }
        GF.fill(body, ...parts);
      }
      draw();
      ctx.every(5000, async () => {
        view = await api("/fleet", { signal: ctx.signal });
        if (ctx.alive()) draw();
      });
    },
  };
})();
