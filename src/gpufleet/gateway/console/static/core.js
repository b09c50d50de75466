// gpufleet console: the shared parts — session, API calls, DOM building, formatting.
// Plain JavaScript for current browsers; no framework and no build step.
"use strict";

const GF = (() => {
  const meta = (name) => document.querySelector(`meta[name="gpufleet-${name}"]`)?.content || "";
  const role = meta("role");
  const session = {
    csrf: meta("csrf"),
    role,
    tenant: meta("tenant"),
    key: meta("key"),
    auth: meta("auth") === "on",
    operator: role === "admin" || role === "operator",
    admin: role === "admin",
  };

  class ApiError extends Error {
    constructor(status, body) {
      const error = body && typeof body === "object" ? body.error || {} : {};
      super(error.message || (typeof body === "string" && body) || `HTTP ${status}`);
      this.status = status;
      this.param = error.param || null;
      this.code = error.code || null;
    }
  }

  // Every call goes to the console's API with the session cookie; a write carries the CSRF
  // token. A 401 means the session ended (signed out elsewhere, key revoked): back to sign-in.
  async function api(path, { method = "GET", body, raw = false, signal } = {}) {
    const headers = { accept: "application/json" };
    if (method !== "GET") headers["x-csrf-token"] = session.csrf;
    if (body !== undefined) headers["content-type"] = "application/json";
    const resp = await fetch("/ui/api" + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      signal,
    });
    if (resp.status === 401) {
      window.location.assign("/ui/login");
      throw new ApiError(401, await readBody(resp));
    }
    if (!resp.ok) throw new ApiError(resp.status, await readBody(resp));
    if (raw) return resp;
    return readBody(resp);
  }

  async function readBody(resp) {
    const text = await resp.text();
    if (!text) return null;
    try {
      return JSON.parse(text);
    } catch {
      return text;
    }
  }

  // h("div", {class: "x", onclick: fn}, "text", child, [more]) — never parses HTML, so names
  // and messages from the server are always text.
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else if (name === "text") el.textContent = value;
      else if (name === "style") Object.assign(el.style, value);
      else if (name === "dataset") Object.assign(el.dataset, value);
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (value === true) el.setAttribute(name, "");
      else el.setAttribute(name, String(value));
    }
    append(el, children);
    return el;
  }

  // el.append / el.replaceChildren, skipping null and false (a part not shown).
  const add = (el, ...children) => { append(el, children); return el; };
  const fill = (el, ...children) => { el.replaceChildren(); append(el, children); return el; };

  function append(el, children) {
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      if (Array.isArray(child)) append(el, child);
      else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  const GIB = 1024 ** 3;
  const fmt = {
    bytes(n) {
      if (n === null || n === undefined) return "–";
      if (n >= 1024 * GIB) return `${(n / (1024 * GIB)).toFixed(1)} TiB`;
      if (n >= GIB) return `${(n / GIB).toFixed(n >= 100 * GIB ? 0 : 1)} GiB`;
      if (n >= 1024 ** 2) return `${(n / 1024 ** 2).toFixed(0)} MiB`;
      return `${n} B`;
    },
    pct(x) {
      return x === null || x === undefined ? "–" : `${Math.round(x * 100)} %`;
    },
    num(n, digits = 0) {
      if (n === null || n === undefined) return "–";
      return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits });
    },
    usd(n) {
      if (n === null || n === undefined) return "–";
      const digits = Math.abs(n) < 0.01 && n !== 0 ? 6 : 2;
      return "$" + Number(n).toLocaleString(undefined, {
        minimumFractionDigits: 2,
        maximumFractionDigits: digits,
      });
    },
    secs(s) {
      if (s === null || s === undefined) return "–";
      if (s < 1) return `${Math.round(s * 1000)} ms`;
      if (s < 120) return `${s.toFixed(1)} s`;
      return `${Math.round(s / 60)} min`;
    },
    ms(v) {
      return v === null || v === undefined ? "–" : `${fmt.num(v, v < 10 ? 1 : 0)} ms`;
    },
    when(unixOrIso) {
      if (!unixOrIso) return "–";
      const d = typeof unixOrIso === "number" ? new Date(unixOrIso * 1000) : new Date(unixOrIso);
      return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
    },
  };

  function phaseBadge(phase) {
    const kind = { Ready: "ok", Starting: "info", Stopping: "warn", Unready: "warn",
      BackOff: "bad", Failed: "bad", Unschedulable: "warn", OffSchedule: "warn",
      ScaledToZero: "" }[phase];
    return h("span", { class: `badge ${kind ?? ""}`, text: phase });
  }

  function toast(message, kind = "") {
    const box = document.getElementById("toasts");
    const el = h("div", { class: `toast ${kind}`, role: "status", text: message });
    box.append(el);
    setTimeout(() => el.remove(), kind === "error" ? 8000 : 4000);
  }

  function errorBox(error) {
    return h("div", { class: "notice error", role: "alert" }, error.message || String(error));
  }

  function pageHead(title, subtitle, ...tools) {
    return h("div", { class: "page-head" },
      h("div", {}, h("h1", { text: title }), subtitle ? h("p", { class: "muted", text: subtitle }) : null),
      h("div", { class: "toolbar" }, tools));
  }

  function card(label, value, sub, cls = "") {
    return h("div", { class: `card ${cls}` },
      h("div", { class: "label", text: label }),
      h("div", { class: "value", text: value }),
      sub ? h("div", { class: "sub", text: sub }) : null);
  }

  function bar(fraction, cls = "used") {
    const f = Math.max(0, Math.min(1, fraction || 0));
    return h("div", { class: cls, style: { width: `${(f * 100).toFixed(1)}%` } });
  }

  function debounce(fn, ms) {
    let timer = null;
    return (...args) => {
      clearTimeout(timer);
      timer = setTimeout(() => fn(...args), ms);
    };
  }

  // Pages register here: {title, needs: "operator"|"admin"|undefined, render(root, args, ctx)}.
  // ``ctx.every(ms, fn)`` runs fn periodically while the page is shown (and the tab visible).
  const pages = {};

  return { session, api, ApiError, h, add, fill, fmt, phaseBadge, toast, errorBox, pageHead, card,
    bar, debounce, pages };
})();
