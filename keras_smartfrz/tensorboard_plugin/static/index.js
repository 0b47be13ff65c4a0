// The SmartFRZ dashboard. TensorBoard loads this ES module in an iframe whose
// base URL is the plugin's route (/data/plugin/smartfrz/) and calls render().
// Plain DOM and SVG, no dependencies, no build step. All data text goes in
// through textContent, never as HTML.

const SVG_NS = "http://www.w3.org/2000/svg";
// Viridis, low score (keep training) to high score (ready to freeze).
const RAMP = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"];
const FROZEN_FILL = "#b0bec5";
const NOT_SCORED_FILL = "#f5f5f5";
const FREEZE_OUTLINE = "#d50000";

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function percent(value) {
  return value === null || value === undefined ? "n/a" : `${(100 * value).toFixed(1)}%`;
}

function hexToRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

function scoreColor(score) {
  const t = Math.min(1, Math.max(0, score)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(t));
  const f = t - i;
  const a = hexToRgb(RAMP[i]);
  const b = hexToRgb(RAMP[i + 1]);
  const mix = a.map((v, k) => Math.round(v + f * (b[k] - v)));
  return `rgb(${mix[0]}, ${mix[1]}, ${mix[2]})`;
}

async function fetchJson(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${url}: HTTP ${response.status}`);
  return body;
}

function lastValue(points) {
  return points && points.length ? points[points.length - 1][1] : null;
}

// ------------------------------------------------------------------ timeline
function drawTimeline(timeline, runIndex) {
  const units = timeline.units;
  let lastEpoch = timeline.last_epoch ?? 0;
  for (const epoch of timeline.epochs) lastEpoch = Math.max(lastEpoch, epoch);
  const epochs = lastEpoch + 1;
  const cell = Math.max(10, Math.min(28, Math.floor(720 / epochs)));
  const rowHeight = 20;
  const longest = Math.max(4, ...units.map((u) => u.name.length));
  const left = Math.min(360, 12 + 6.6 * longest);
  const top = 24;
  const right = 190;
  const width = left + epochs * cell + right;
  const height = top + units.length * rowHeight + 26;
  const root = svg("svg", {
    width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `Freezing timeline of ${timeline.run}`,
  });
  const hatchId = `smartfrz-frozen-${runIndex}`;
  const defs = svg("defs");
  const pattern = svg("pattern", {
    id: hatchId, width: 6, height: 6, patternUnits: "userSpaceOnUse",
    patternTransform: "rotate(45)",
  });
  pattern.append(svg("rect", { width: 6, height: 6, fill: FROZEN_FILL }));
  pattern.append(svg("line", { x1: 0, y1: 0, x2: 0, y2: 6, stroke: "#78909c", "stroke-width": 2 }));
  defs.append(pattern);
  root.append(defs);

  const labelEvery = Math.max(1, Math.ceil(24 / cell));
  const axis = svg("g", { class: "axis" });
  for (let e = 0; e < epochs; e++) {
    if (e % labelEvery && e !== epochs - 1) continue;
    axis.append(svg("text", {
      x: left + e * cell + cell / 2, y: top - 8, "text-anchor": "middle",
    }, String(e + 1)));
  }
  axis.append(svg("text", {
    x: left + (epochs * cell) / 2, y: height - 6, "text-anchor": "middle",
  }, "epoch"));
  root.append(axis);

  units.forEach((unit, row) => {
    const y = top + row * rowHeight;
    const isHead = row === units.length - 1;
    const frozenAt = unit.frozen_epoch;
    // The tooltip sits beside the label, so the label's text is the name alone.
    const labelGroup = svg("g");
    labelGroup.append(
      svg("title", {}, `${unit.name}: ${unit.num_params} parameters`),
      svg("text", {
        class: "unit-name", x: left - 8, y: y + rowHeight / 2 + 4, "text-anchor": "end",
      }, unit.name),
    );
    root.append(labelGroup);
    const scores = new Map(unit.scores.map(([step, value]) => [step, value]));
    for (let e = 0; e < epochs; e++) {
      let fill = NOT_SCORED_FILL;
      let tip = `${unit.name}, epoch ${e + 1}: not scored`;
      if (frozenAt !== null && frozenAt !== undefined && e > frozenAt) {
        fill = `url(#${hatchId})`;
        tip = `${unit.name}, epoch ${e + 1}: frozen`;
      } else if (scores.has(e)) {
        fill = scoreColor(scores.get(e));
        tip = `${unit.name}, epoch ${e + 1}: score ${scores.get(e).toFixed(3)}`;
      }
      const rect = svg("rect", {
        x: left + e * cell + 0.5, y: y + 1, width: cell - 1, height: rowHeight - 2, fill,
      });
      if (e === frozenAt) {
        rect.setAttribute("stroke", FREEZE_OUTLINE);
        rect.setAttribute("stroke-width", 2);
        tip += " (froze here)";
      }
      rect.append(svg("title", {}, tip));
      root.append(rect);
    }
    let status = "trains";
    let cls = "unit-status";
    if (frozenAt !== null && frozenAt !== undefined) {
      status = `froze, end of epoch ${frozenAt + 1}`;
      cls += " frozen-label";
    } else if (isHead) {
      status = "head (never freezes)";
    }
    root.append(svg("text", {
      class: cls, "data-unit": unit.name, x: left + epochs * cell + 10,
      y: y + rowHeight / 2 + 4,
    }, status));
  });
  return root;
}

function legend(runIndex) {
  const box = el("div", { class: "legend" });
  const ramp = el("span", { class: "ramp" });
  ramp.style.background = `linear-gradient(to right, ${RAMP.join(", ")})`;
  const scoreItem = el("span");
  scoreItem.append("score 0", ramp, "1 (ready to freeze)");
  const frozen = el("span");
  const hatch = el("span", { class: "swatch" });
  hatch.style.background = `repeating-linear-gradient(45deg, ${FROZEN_FILL} 0 3px, #78909c 3px 5px)`;
  frozen.append(hatch, "frozen");
  const froze = el("span");
  const outline = el("span", { class: "swatch" });
  outline.style.border = `2px solid ${FREEZE_OUTLINE}`;
  froze.append(outline, "stage that froze it");
  const unscored = el("span");
  const blank = el("span", { class: "swatch" });
  blank.style.background = NOT_SCORED_FILL;
  unscored.append(blank, "not scored (no stage, or the head)");
  box.append(scoreItem, froze, frozen, unscored);
  return box;
}

// -------------------------------------------------------------------- charts
function lineChart(title, series, lastEpoch) {
  const width = 380;
  const height = 170;
  const m = { left: 40, right: 12, top: 10, bottom: 34 };
  const w = width - m.left - m.right;
  const h = height - m.top - m.bottom;
  const xMax = Math.max(1, lastEpoch);
  const x = (epoch) => m.left + (w * epoch) / xMax;
  const y = (value) => m.top + h * (1 - value);
  const box = el("div", { class: "chart" });
  box.append(el("h3", {}, title));
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}` });
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    root.append(svg("line", {
      x1: m.left, x2: m.left + w, y1: y(tick), y2: y(tick), stroke: "#eeeeee",
    }));
    root.append(svg("text", { x: m.left - 4, y: y(tick) + 3, "text-anchor": "end" },
      `${Math.round(tick * 100)}%`));
  }
  const every = Math.max(1, Math.ceil((lastEpoch + 1) / 10));
  for (let e = 0; e <= lastEpoch; e += every) {
    root.append(svg("text", { x: x(e), y: m.top + h + 14, "text-anchor": "middle" },
      String(e + 1)));
  }
  root.append(svg("text", { x: m.left + w / 2, y: height - 4, "text-anchor": "middle" },
    "epoch"));
  series.forEach((s, index) => {
    if (!s.points.length) return;
    const coords = s.points.map(([step, value]) => `${x(step)},${y(value)}`).join(" ");
    root.append(svg("polyline", {
      points: coords, fill: "none", stroke: s.color, "stroke-width": 2,
    }));
    for (const [step, value] of s.points) {
      const dot = svg("circle", { cx: x(step), cy: y(value), r: 2.5, fill: s.color });
      dot.append(svg("title", {}, `${s.label}, epoch ${step + 1}: ${percent(value)}`));
      root.append(dot);
    }
    root.append(svg("text", {
      class: "series-label", x: m.left + 6, y: m.top + 12 + 13 * index, fill: s.color,
      style: `fill: ${s.color}`,
    }, s.label));
  });
  box.append(root);
  return box;
}

function frozenTable(timeline) {
  const frozen = timeline.units
    .filter((u) => u.frozen_epoch !== null && u.frozen_epoch !== undefined)
    .sort((a, b) => a.frozen_epoch - b.frozen_epoch);
  const box = el("div");
  box.append(el("h3", {}, "Frozen units, in freeze order"));
  if (!frozen.length) {
    box.append(el("div", { class: "message" }, "Nothing frozen yet."));
    return box;
  }
  const table = el("table", { class: "frozen-units" });
  const head = el("tr");
  for (const text of ["unit", "froze (end of epoch)", "parameters"]) head.append(el("th", {}, text));
  table.append(head);
  for (const unit of frozen) {
    const row = el("tr");
    row.append(el("td", { class: "unit-name" }, unit.name));
    row.append(el("td", { class: "num" }, String(unit.frozen_epoch + 1)));
    row.append(el("td", { class: "num" }, String(unit.num_params)));
    table.append(row);
  }
  box.append(table);
  return box;
}

function renderRun(timeline, runIndex) {
  const section = el("section", { class: "run", "data-run": timeline.run });
  section.append(el("h2", {}, timeline.run));
  const frozenCount = timeline.units.filter(
    (u) => u.frozen_epoch !== null && u.frozen_epoch !== undefined).length;
  const s = timeline.series;
  const summary = el("div", { class: "run-summary" });
  summary.textContent =
    `${frozenCount} of ${timeline.units.length} units frozen ` +
    `(${percent(lastValue(s.frozen_param_fraction))} of the parameters). ` +
    `Estimated training compute saved so far: ${percent(lastValue(s.compute_saved))}; ` +
    `a train step now costs about ${percent(lastValue(s.step_compute_saved))} less.`;
  section.append(summary);
  const timelineBox = el("div", { class: "timeline", "data-run": timeline.run });
  timelineBox.append(drawTimeline(timeline, runIndex));
  section.append(legend(runIndex), timelineBox);
  const lastEpoch = Math.max(timeline.last_epoch ?? 0, ...timeline.epochs, 0);
  const panels = el("div", { class: "panels" });
  panels.append(
    frozenTable(timeline),
    lineChart("Frozen fraction", [
      { label: "units", color: "#1565c0", points: s.frozen_fraction },
      { label: "parameters", color: "#ef6c00", points: s.frozen_param_fraction },
    ], lastEpoch),
    lineChart("Estimated compute saved", [
      { label: "training so far", color: "#2e7d32", points: s.compute_saved },
      { label: "per step, from the next epoch", color: "#8e24aa", points: s.step_compute_saved },
    ], lastEpoch),
  );
  section.append(panels);
  return section;
}

// ---------------------------------------------------------------------- page
async function load(container) {
  document.body.dataset.state = "loading";
  container.replaceChildren(el("div", { class: "message" }, "Loading..."));
  try {
    const { runs } = await fetchJson("runs");
    if (!runs.length) {
      container.replaceChildren(el("div", { class: "message" },
        "No SmartFRZ data. Pass log_dir= to a freezing callback " +
        "(keras_smartfrz.SmartFRZ, AutoFreeze, LinearFreezing) and point " +
        "tensorboard --logdir at it."));
      document.body.dataset.state = "empty";
      return;
    }
    const timelines = await Promise.all(runs.map(({ run }) =>
      fetchJson(`timeline?run=${encodeURIComponent(run)}`)));
    container.replaceChildren(...timelines.map(renderRun));
    document.body.dataset.state = "ready";
  } catch (error) {
    container.replaceChildren(el("div", { class: "message error" }, String(error.message || error)));
    document.body.dataset.state = "error";
  }
}

export async function render() {
  document.head.append(el("link", { rel: "stylesheet", href: "static/style.css" }));
  const header = el("header");
  header.append(el("h1", {}, "SmartFRZ: freeze decisions"));
  const reload = el("button", { type: "button" }, "Reload");
  header.append(reload);
  const note = el("p", { class: "note" },
    "One panel per run. Rows are the freezable units in forward order, columns " +
    "the epochs; each cell is the policy's score at that freezing stage. Compute " +
    "saved is an estimate from parameter counts (a frozen unit skips its weight " +
    "gradient, and its input gradient too behind a frozen prefix), not a timing.");
  const container = el("div", { id: "runs" });
  document.body.append(header, note, container);
  reload.addEventListener("click", () => load(container));
  await load(container);
}
