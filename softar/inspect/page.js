// softar inspect: draws the payload (PAGE.json, embedded below) with DOM calls only; no network, no libraries.
"use strict";
const P = JSON.parse(document.getElementById("payload").textContent);

function el(tag, attrs, ...children) {
  const node = tag === "svg" || ["path", "line", "text", "g", "rect"].includes(tag)
    ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.setAttribute("class", v); else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}
const fmt = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const shown = (t) => t.replace(/\n/g, "↵\n").replace(/\t/g, "→");  // whitespace made visible, never interpreted
const inf = (x) => (x === null ? "∞" : x);

// --- header ---------------------------------------------------------------------------------------------------------
function header() {
  const r = P.run, m = r.model, lay = r.layout, d = P.decoding;
  const layout = lay.plain ? `plain window of ${lay.window_slots} slots`
    : `${lay.aggregate} aggregate + ${lay.segments.length} segments (${lay.segments.join(", ")} tokens) + ` +
      `${lay.hard} hard + ${lay.soft} soft slots, op ${lay.op}`;
  const parts = [["run", `${r.dir} @ step ${r.step}`], ["model", `${m.n_layer} layers, d ${m.d_model}, ` +
    `vocabulary ${m.vocab_size}, m = ${m.embedding_dim}`], ["window", layout]];
  if (P.kind === "task") {
    parts.push(["task", `${P.task.name}, ${P.task.file} record ${P.task.index}, mode ${d.task_mode}, stage ${d.stage}`]);
    parts.push(["answer", `${P.task.answer || "(none)"} — expected ${P.task.target} — ${P.task.correct ? "correct" : "wrong"}`]);
  } else {
    parts.push(["decoding", `${d.mode}` + (d.mode === "soft" ? ` (${d.soft}, noise ${d.noise}, shown by ${d.collapse})` : "") +
      `, temperature ${d.temperature}, top-k ${d.top_k}, top-p ${d.top_p}, seed ${P.seed}`]);
    if (P.policy.applies) parts.push(["collapse policy", `${P.policy.score} ${P.policy.keep_uncertain ? "<" : ">"} ` +
      `${inf(P.policy.threshold)}` + (P.policy.budget >= 0 ? `, budget ${P.policy.budget}` : "")]);
  }
  parts.push(["tokens", `${P.prompt_tokens} prompt + ${P.generated_tokens} generated` + (P.stopped ? " (stopped)" : "")]);
  const meta = document.getElementById("meta");
  for (const [k, v] of parts) meta.append(el("div", {}, el("b", { text: k + ": " }), v));
}

// --- the text and one token in detail -------------------------------------------------------------------------------
let selected = null;
function text() {
  const box = document.getElementById("text");
  for (const t of P.tokens) {
    const cls = ["tok", `tier-${t.tier}`, `source-${t.source}`];
    if (t.source === "prompt") cls.push("prompt");
    if (t.collapsed) cls.push("collapsed");
    const span = el("span", { class: cls.join(" "), "data-i": t.i, tabindex: 0, text: shown(t.text) });
    span.addEventListener("mouseenter", () => { if (selected === null) detail(t); });
    span.addEventListener("click", () => select(t.i));
    span.addEventListener("keydown", (e) => { if (e.key === "Enter") select(t.i); });
    box.append(span);
    if (P.kind === "task") box.append(" ");  // a task's tokens are words
  }
}
function select(i) {
  const spans = document.querySelectorAll("#text .tok");
  if (selected !== null) spans[selected].classList.remove("selected");
  selected = selected === i ? null : i;
  if (selected !== null) { spans[i].classList.add("selected"); detail(P.tokens[i]); }
}
function bars(title, rows, chosen, unit) {
  const max = Math.max(...rows.map((r) => r[1]), 1e-12);
  const box = el("div", { class: `bars ${unit}` }, el("div", { class: "note", text: title }));
  for (const [label, v] of rows) {
    const row = el("div", { class: "barrow" + (label === chosen ? " chosen" : "") },
      el("code", { text: shown(label) }),
      el("div", {}, el("div", { class: "bar", style: `width:${(100 * (unit === "dist" ? 1 - v / (max * 1.05) : v / max)).toFixed(1)}%` })),
      el("div", { class: "num", text: fmt(v, unit === "p" ? 3 : 2) }));
    box.append(row);
  }
  return box;
}
function detail(t) {
  const box = document.getElementById("detail");
  box.replaceChildren();
  box.setAttribute("data-token", t.i);
  const rows = [["token", `#${t.i} ${JSON.stringify(t.text)}`], ["source", t.source],
    ["tier", t.region === t.tier || t.region === "tokens" ? t.tier : `${t.tier} (${t.region})`]];
  if (t.collapsed) rows.push(["collapsed", `in place, ${t.why}`]);
  if ("logprob" in t) rows.push(["log p", fmt(t.logprob)]);
  if ("entropy" in t) rows.push(["entropy", `${fmt(t.entropy)} nats`]);
  if (t.score !== null && t.score !== undefined && P.policy.score !== "none") rows.push([`OOD (${P.policy.score})`, fmt(t.score)]);
  if ("norm" in t) rows.push(["norm", fmt(t.norm)]);
  const table = el("table");
  for (const [k, v] of rows) table.append(el("tr", {}, el("td", { class: "k", text: k }), el("td", { text: String(v) })));
  box.append(table);
  if (t.topk) box.append(el("div", { class: "topk" }, bars("the model's next-token distribution here (top 10; temperature 1, unfiltered)", t.topk, t.text, "p")));
  if (t.nearest) box.append(el("div", { class: "nearest" }, bars("nearest vocabulary tokens to the vector that re-entered (L2)", t.nearest, null, "dist")));
  if (t.nodes) {
    const inF = new Set(t.frontier);
    box.append(el("div", { class: "nodes" }, bars(`graph nodes it reads as (depth ${t.depth}; * = in the frontier)`,
      t.nodes.map(([n, s]) => [inF.has(n) ? `${n} *` : n, s]), null, "score")));
    box.append(el("div", { class: "note", text: `breadth-first frontier at depth ${t.depth}: ${t.frontier.join(" ") || "(empty)"}` }));
  }
}

// --- the window at a step -------------------------------------------------------------------------------------------
function windowStrip() {
  const slider = document.getElementById("step");
  slider.max = P.steps.length - 1;
  slider.value = P.steps.length - 1;
  slider.addEventListener("input", () => drawWindow(Number(slider.value)));
  drawWindow(P.steps.length - 1);
}
function drawWindow(s) {
  const step = P.steps[s], strip = document.getElementById("strip"), labels = document.getElementById("strip-labels");
  strip.replaceChildren(); labels.replaceChildren();
  const last = s === P.steps.length - 1;
  const next = P.prompt_tokens + s;
  document.getElementById("step-label").textContent = last
    ? `the window after the last token (step ${s})`
    : `step ${s}: the window that produced token #${next} ${JSON.stringify(P.tokens[next].text)}`;
  const inwin = new Set();
  let softIndex = 0;
  for (const r of step.regions) {
    const kind = r.name.startsWith("segment") ? "segment" : r.name;
    const count = r.to - r.from;
    if (r.slots === 1 && (kind === "segment" || kind === "aggregate")) {
      const slot = el("div", { class: `slot summary kind-${kind}` + (count ? "" : " empty"),
        title: `${r.name}: ${count ? `tokens #${r.from}–#${r.to - 1} (${count})` : "empty"}` });
      strip.append(slot);
      labels.append(el("span", { text: `${r.name} ${count ? `#${r.from}–#${r.to - 1}` : "empty"}` }));
      for (let i = r.from; i < r.to; i++) inwin.add(i);
      continue;
    }
    for (let i = r.from; i < r.to; i++) {
      const tok = P.tokens[i];
      // a token slot (plain window or soft region) holds what re-entered; a soft slot collapsed in place is hatched
      const k = kind === "tokens" || kind === "soft" ? tok.entered : kind;
      const collapsed = kind === "soft" && step.soft_collapsed[softIndex++] && tok.entered === "soft";
      strip.append(el("div", { class: `slot kind-${k}` + (collapsed ? " collapsed" : ""),
        title: `${kind}: #${i} ${JSON.stringify(tok.text)}` + (collapsed ? " (collapsed)" : "") }));
      inwin.add(i);
    }
    if (count) labels.append(el("span", { text: `${kind} #${r.from}–#${r.to - 1} (${count})` }));
  }
  document.querySelectorAll("#text .tok").forEach((span, i) => span.classList.toggle("inwin", !last && inwin.has(i)));
}

// --- charts ---------------------------------------------------------------------------------------------------------
function chart(title, series, opts = {}) {
  const W = opts.width || 460, H = 170, L = 40, R = 8, T = 14, B = 22;
  const pts = series.flatMap((s) => s.points);
  const box = el("div", { class: "chart" }, el("h3", { text: title }));
  if (!pts.length) { box.append(el("div", { class: "note", text: "no data" })); return box; }
  const range = (xs) => xs.reduce(([lo, hi], x) => [Math.min(lo, x), Math.max(hi, x)], [Infinity, -Infinity]);
  let [x0, x1] = range(pts.map((p) => p[0]));
  let [y0, y1] = range(pts.map((p) => p[1]).concat(opts.hline === undefined || opts.hline === null ? [] : [opts.hline]));
  if (x1 === x0) x1 = x0 + 1; if (y1 === y0) { y0 -= 1; y1 += 1; }
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R), Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" },
    el("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }), el("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    el("text", { x: 2, y: T + 8, text: fmt(y1, 2) }), el("text", { x: 2, y: H - B, text: fmt(y0, 2) }),
    el("text", { x: L, y: H - 6, text: String(x0) }), el("text", { x: W - R - 30, y: H - 6, text: String(x1) }));
  if (opts.xlabel) svg.append(el("text", { x: (W - L) / 2, y: H - 6, text: opts.xlabel }));
  series.forEach((s, k) => {
    if (!s.points.length) return;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    svg.append(el("path", { class: `s${k % 4}`, d }));
  });
  if (opts.hline !== undefined && opts.hline !== null) {
    svg.append(el("line", { class: "threshold", x1: L, x2: W - R, y1: Y(opts.hline), y2: Y(opts.hline) }));
    svg.append(el("text", { x: L + 4, y: Y(opts.hline) - 3, text: opts.hlabel }));
  }
  box.append(svg);
  box.append(el("div", { class: "legend" }, ...series.map((s, k) => el("span", {},
    el("i", { style: `background: var(--${["hard", "soft", "segment", "aggregate"][k % 4]})` }), s.name))));
  return box;
}
function overTime() {
  const gen = P.tokens.filter((t) => t.source === "generated");
  const series = [{ name: "entropy (nats)", points: gen.map((t, s) => [s, t.entropy]) }];
  if (P.policy.score !== "none" && P.policy.score !== "entropy")
    series.push({ name: `OOD score (${P.policy.score})`,
      points: gen.map((t, s) => [s, t.score]).filter((p) => p[1] !== null) });
  const hline = P.policy.applies ? P.policy.threshold : null;
  document.getElementById("time").append(chart("per generated token", series,
    { xlabel: "step", hline, hlabel: `collapse threshold ${fmt(hline, 2)}`, width: 920 }));
}
function runCurves() {
  const c = P.metrics.curves, box = document.getElementById("curves");
  if (P.metrics.note) box.append(el("div", { class: "note", text: P.metrics.note }));
  const loss = [["train loss", c.train_loss_step], ["eval: train", c.train_loss], ["eval: valid", c.val_loss]]
    .filter(([, p]) => p).map(([name, points]) => ({ name, points }));
  box.append(chart("loss", loss, { xlabel: "step" }));
  const others = Object.keys(c).filter((n) => !["train_loss_step", "train_loss", "val_loss"].includes(n));
  for (const name of others.filter((n) => c[n].length > 1)) {  // the embedding diagnostics (E_*), then whatever else the evals logged
    const title = name.startsWith("E_") ? `embedding: ${name.slice(2).replace(/_/g, " ")}` : name.replace(/_/g, " ");
    box.append(chart(title, [{ name, points: c[name] }], { xlabel: "step" }));
  }
}

header(); text(); windowStrip(); overTime(); runCurves();
document.body.setAttribute("data-ready", "1");
