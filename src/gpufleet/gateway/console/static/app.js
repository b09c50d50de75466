// gpufleet console: the router. A page is chosen by the URL's hash (#/models/NAME); pages a
// role may not use are neither linked nor shown (the server refuses their actions anyway).
"use strict";

(() => {
  const { session, pages, h } = GF;
  const root = document.getElementById("page");
  let ctx = null;

  const allowed = (page) =>
    !page.needs || (page.needs === "operator" ? session.operator : session.admin);
  const home = () => (session.operator ? "fleet" : "playground");

  for (const link of document.querySelectorAll("#nav a[data-page]")) {
    const page = pages[link.dataset.page];
    if (!page || !allowed(page)) link.remove();
  }

  function context() {
    const timers = [];
    const aborts = new AbortController();
    const self = {
      signal: aborts.signal,
      alive: () => ctx === self,
      // Run fn every ms while this page is shown and the tab visible; a slow fn is not stacked.
      every(ms, fn) {
        let busy = false;
        timers.push(setInterval(async () => {
          if (busy || document.hidden || !self.alive()) return;
          busy = true;
          try {
            await fn();
          } catch (error) {
            if (error.name !== "AbortError") console.warn(error);
          } finally {
            busy = false;
          }
        }, ms));
      },
      close() {
        timers.forEach(clearInterval);
        aborts.abort();
      },
    };
    return self;
  }

  async function show() {
    const [first = "", ...args] = window.location.hash.replace(/^#\/?/, "").split("/")
      .map((part) => decodeURIComponent(part));
    let name = pages[first] ? first : home();
    const refused = pages[first] && !allowed(pages[first]);
    if (refused) name = home();
    if (ctx) ctx.close();
    ctx = context();
    const mine = ctx;
    for (const link of document.querySelectorAll("#nav a")) {
      link.classList.toggle("active", link.dataset.page === name);
    }
    document.title = `${pages[name].title} · gpufleet`;
    root.replaceChildren();
    if (refused) {
      GF.add(root, h("div", { class: "notice" },
        `The page “${first}” needs the role ${pages[first].needs}; this session's key is a ${session.role} key.`));
    }
    try {
      await pages[name].render(root, args, mine);
    } catch (error) {
      if (mine.alive() && error.name !== "AbortError") GF.add(root, GF.errorBox(error));
    }
  }

  window.addEventListener("hashchange", show);
  show();
})();
