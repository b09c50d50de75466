// Time-series charts: a thin wrapper over uPlot (MIT; static/vendor) that fits its box.
"use strict";

(() => {
  const { h } = GF;
  const PALETTE = ["#2457d6", "#1f8a4c", "#d98c00", "#c9372c", "#7c3aed", "#0891b2", "#be185d",
    "#4d7c0f", "#9a3412", "#334155"];

  // chart(box, {x: [unix s], series: [{label, values}], unit: "ms"}) draws into ``box``;
  // returns the uPlot instance (or null when there is nothing to draw).
  function chart(box, { x, series, unit = "", format = null, height = 220, stacked = false }) {
    box.replaceChildren();
    box.classList.add("chart");
    const drawn = series.filter((s) => s.values.some((v) => v !== null && v !== undefined));
    if (!x.length || !drawn.length) {
      box.append(h("div", { class: "empty", text: "No data in this window yet." }));
      return null;
    }
    let data = drawn.map((s) => s.values);
    if (stacked) {
      const sums = x.map(() => 0);
      data = data.map((values) => values.map((v, i) => (sums[i] += v || 0)));
    }
    const tick = (v) => (v === null || v === undefined ? "–"
      : format ? format(v) : `${formatNumber(v)}${unit ? ` ${unit}` : ""}`);
    const options = {
      width: Math.max(280, box.clientWidth || 600),
      height,
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: true } },
      axes: [{}, { values: (_u, ticks) => ticks.map(tick), size: 84 }],
      series: [{}, ...drawn.map((s, i) => ({
        label: s.label,
        stroke: PALETTE[i % PALETTE.length],
        width: 1.6,
        fill: stacked ? `${PALETTE[i % PALETTE.length]}22` : undefined,
        value: (_u, v) => tick(v),
        spanGaps: false,
        // Points where a line would not show: few values, or values between gaps.
        points: { show: s.values.filter((v) => v !== null && v !== undefined).length < 40 },
      }))],
    };
    const plot = new uPlot(options, [x, ...data], box);
    const observer = new ResizeObserver(() => {
      if (!box.isConnected) {
        observer.disconnect();
        plot.destroy();
        return;
      }
      plot.setSize({ width: Math.max(280, box.clientWidth), height });
    });
    observer.observe(box);
    return plot;
  }

  function formatNumber(v) {
    const a = Math.abs(v);
    if (Number.isInteger(v) && a < 1e4) return String(v);
    if (a >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
    if (a >= 1e4) return `${(v / 1e3).toFixed(0)}k`;
    if (a >= 100) return v.toFixed(0);
    if (a >= 1) return v.toFixed(1);
    return v.toPrecision(2);
  }

  GF.chart = chart;
})();
