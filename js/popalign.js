// PopAlign front-end widgets (ComfyUI extension; no build step, no dependencies).
//
// Written only against hooks that both the legacy ComfyUI frontend (web/scripts/*.js, 2024) and the current
// ComfyUI frontend provide: app.registerExtension + beforeRegisterNodeDef, nodeType.prototype.onNodeCreated /
// onExecuted / onSerialize / onConfigure / computeSize, node.addDOMWidget and api.addEventListener.
//
//   PopAlign.BiasChart     PopAlignBiasMetrics: per-class shares (per prompt and their mean) against the target,
//                          drawn on a <canvas> after execution; data in node.popalignChart.
//   PopAlign.TargetEditor  PopAlignTargetDistribution: sliders per class per axis (each axis sums to 1), for
//                          target_json and for every prompt of prompt_targets_json; the JSON text stays the truth.
//   PopAlign.LossCurve     PopAlignLoRATrainer / PopAlignDistributionalAlignment: live loss curve from the
//                          "popalign.loss" websocket events, replaced by the node's final rows; node.popalignLoss.
//
// The DOM widgets never take a slot in widgets_values (serialize: false and trimmed in onSerialize), so the Python
// widgets of saved workflows keep their positions.
//
// Frontend 1.3x "Nodes 2.0" (setting Comfy.VueNodes.Enabled, LiteGraph.vueNodesMode): nodes are Vue components;
// the canvas draws no node, so widget options.onDraw never runs, and a DOM widget's element is moved into the Vue
// node with no height set. There each widget sets its element's height itself (vueSize), on creation and on every
// refit, and redraws from a ResizeObserver and on new data (never from onDraw).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TAG = "[PopAlign]";
const DIGITS = 4; // shares are written with 4 decimals; each axis sums to exactly 1 in those units
const UNIT = 10 ** DIGITS;
const COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"];
const BG = "#1b1b1b";
const FG = "#dddddd";
const GRID = "#3a3a3a";
const MAX_PROMPT_BARS = 6; // more prompts than this: only their mean is drawn
const CHART_H = 220;
const LOSS_H = 170;
const IDLE_H = 44; // a widget without data yet stays small (the committed workflows keep their layout)

// ------------------------------------------------------------------------------------------------ shared helpers
let stylesAdded = false;
function addStyles() {
	if (stylesAdded) return;
	stylesAdded = true;
	const style = document.createElement("style");
	style.textContent = `
.popalign-widget { box-sizing: border-box; font: 11px sans-serif; color: ${FG}; overflow: hidden; }
.popalign-widget canvas { display: block; width: 100%; height: 100%; border-radius: 4px; }
.popalign-editor { overflow-y: auto; background: var(--comfy-input-bg, #222); border-radius: 4px; padding: 2px 4px; }
.popalign-editor .pa-section { margin: 0 0 4px 0; }
.popalign-editor .pa-title { height: 16px; line-height: 16px; font-weight: bold; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; opacity: 0.9; }
.popalign-editor .pa-axis { height: 16px; line-height: 16px; opacity: 0.75; padding-left: 4px; }
.popalign-editor .pa-row { display: flex; align-items: center; height: 20px; padding-left: 8px; }
.popalign-editor .pa-row label { flex: 0 0 30%; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.popalign-editor .pa-row input[type=range] { flex: 1 1 auto; min-width: 40px; margin: 0 6px; height: 14px; }
.popalign-editor .pa-row .pa-val { flex: 0 0 44px; text-align: right; font-family: monospace; }
.popalign-editor .pa-note { height: 16px; line-height: 16px; opacity: 0.8; font-style: italic;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.popalign-editor .pa-error { color: #ff8080; }
.popalign-editor .pa-joint { font-family: monospace; padding-left: 8px; line-height: 16px; height: 16px;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
`;
	document.head.append(style);
}

function graphNodes() {
	const g = app.graph;
	return (g && (g._nodes || g.nodes)) || [];
}

function nodeById(id) {
	const key = String(id);
	return graphNodes().find((n) => String(n.id) === key) || null;
}

function findWidget(node, name) {
	return (node.widgets || []).find((w) => w && w.name === name) || null;
}

function isNum(v) {
	return typeof v === "number" && Number.isFinite(v);
}

function trunc(text, n) {
	text = String(text);
	return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

/** A DOM widget that never serialises a value; `height()` gives its wanted height (px, margins included). */
function addPopAlignWidget(node, name, element, height) {
	addStyles();
	const widget = node.addDOMWidget(name, "popalign", element, {
		serialize: false, // not sent to the server
		hideOnZoom: true,
		getMinHeight: () => height(),
		getMaxHeight: () => height(),
		getHeight: () => height(),
	});
	try {
		widget.serialize = false; // current frontend: no slot in widgets_values
	} catch (err) {
		// a read-only property in some frontend version: onSerialize trims the value instead
	}
	widget.popalignHeight = height;
	(node.popalignWidgets ||= []).push(widget);
	vueSize(widget);
	// the renderer can change while the node lives (the setting is switched): the element is then moved, and resized
	if (typeof ResizeObserver !== "undefined") new ResizeObserver(() => vueSize(widget)).observe(element);
	return widget;
}

/** Prototype hooks shared by every node type with a PopAlign widget (serialisation and size). */
function patchNodeType(nodeType) {
	if (nodeType.prototype.popalignPatched) return;
	nodeType.prototype.popalignPatched = true;

	const onSerialize = nodeType.prototype.onSerialize;
	nodeType.prototype.onSerialize = function (o) {
		const r = onSerialize?.apply(this, arguments);
		// the legacy frontend writes every widget's value (ours as null): drop ours so the Python widgets'
		// values are exactly what the node declares (no trailing entries, no shifted positions)
		const ws = this.widgets || [];
		if (Array.isArray(o?.widgets_values) && o.widgets_values.length === ws.length) {
			for (let i = ws.length - 1; i >= 0; i--) {
				if (this.popalignWidgets?.includes(ws[i])) o.widgets_values.splice(i, 1);
			}
		}
		return r;
	};

	// the legacy LiteGraph copies LGraphNode's methods onto the class only after beforeRegisterNodeDef
	const computeSize = nodeType.prototype.computeSize ?? globalThis.LGraphNode?.prototype?.computeSize;
	nodeType.prototype.computeSize = function () {
		const size = computeSize.apply(this, arguments);
		// the legacy LiteGraph counts a DOM widget as one plain widget row; the current one asks the widget
		// (computeLayoutSize): add our height only where it is not counted
		for (const w of this.popalignWidgets || []) {
			if (!w.computeLayoutSize && !w.computeSize && this.widgets?.includes(w)) {
				size[1] += Math.max(0, w.popalignHeight() - (globalThis.LiteGraph?.NODE_WIDGET_HEIGHT ?? 20));
			}
		}
		return size;
	};
}

/** Whether the current frontend draws nodes as Vue components ("Nodes 2.0"); false in the legacy frontend. */
function vueNodes() {
	return globalThis.LiteGraph?.vueNodesMode === true;
}

/** In Nodes 2.0 the element's own CSS decides its height: give it the height the widget wants (else leave it). */
function vueSize(widget) {
	const el = widget.element;
	if (!el?.style) return;
	el.style.height = vueNodes() ? `${Math.max(30, widget.popalignHeight() - 20)}px` : "";
}

/** Grow the node when its widgets need more room, and let the frontend lay the DOM widgets out again. */
function refit(node) {
	for (const w of node.popalignWidgets || []) vueSize(w);
	try {
		const want = node.computeSize();
		const size = [Math.max(node.size[0], want[0]), Math.max(node.size[1], want[1])];
		if (node.setSize) node.setSize(size);
		else node.size = size;
		(node.graph || app.graph)?.setDirtyCanvas?.(true, true);
	} catch (err) {
		console.warn(TAG, "resize failed", err);
	}
}

/** A canvas in a DOM widget, redrawn (by `paint(ctx, w, h)`) when its data or its size changes. */
function makeCanvasWidget(node, name, height, paint) {
	const box = document.createElement("div");
	box.className = "popalign-widget";
	const canvas = document.createElement("canvas");
	canvas.className = `popalign-canvas popalign-${name}`;
	box.append(canvas);
	let drawn = "";
	const redraw = (force) => {
		const ratio = window.devicePixelRatio || 1;
		// hidden (off screen, collapsed, zoomed out): draw at the size the node gives, so the data stays visible
		const w = Math.max(120, Math.round(box.clientWidth || node.size[0] - 20));
		const h = Math.max(30, Math.round(box.clientHeight || height() - 20));
		const key = `${w}x${h}@${ratio}`;
		if (!force && key === drawn) return;
		drawn = key;
		canvas.width = Math.round(w * ratio);
		canvas.height = Math.round(h * ratio);
		const ctx = canvas.getContext("2d");
		ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
		ctx.fillStyle = BG;
		ctx.fillRect(0, 0, w, h);
		try {
			paint(ctx, w, h);
		} catch (err) {
			console.error(TAG, `drawing ${name} failed`, err);
		}
	};
	const widget = addPopAlignWidget(node, name, box, height);
	widget.options.onDraw = () => redraw(false);
	if (typeof ResizeObserver !== "undefined") new ResizeObserver(() => redraw(false)).observe(box);
	widget.popalignRedraw = () => redraw(true);
	widget.popalignCanvas = canvas;
	redraw(true);
	return widget;
}

function text(ctx, s, x, y, opts = {}) {
	ctx.font = opts.font || "11px sans-serif";
	ctx.fillStyle = opts.color || FG;
	ctx.textAlign = opts.align || "left";
	ctx.textBaseline = opts.baseline || "alphabetic";
	ctx.fillText(s, x, y);
}

// --------------------------------------------------------------------------------------------- (a) bias chart
function meanShares(chart) {
	const rows = Object.values(chart.shares || {}).filter((r) => Array.isArray(r));
	return (chart.classes || []).map((_, i) => {
		const vals = rows.map((r) => r[i]).filter(isNum);
		return vals.length ? vals.reduce((a, b) => a + b, 0) / vals.length : 0;
	});
}

function paintChart(node, ctx, W, H) {
	const chart = node.popalignChart;
	if (!chart || !Array.isArray(chart.classes) || !chart.classes.length) {
		text(ctx, "class shares vs target: run the workflow", W / 2, H / 2 + 4, { align: "center", color: "#999" });
		return;
	}
	const classes = chart.classes;
	const prompts = Object.keys(chart.shares || {});
	const mean = meanShares(chart);
	let series;
	if (prompts.length <= 1) {
		series = [{ name: prompts[0] ?? "share", values: mean, color: COLORS[0] }];
	} else {
		series = prompts.length <= MAX_PROMPT_BARS
			? prompts.map((p, i) => ({ name: p, values: chart.shares[p], color: COLORS[i % COLORS.length] }))
			: [];
		series.push({ name: `mean of ${prompts.length} prompts`, values: mean, color: "#e8e8e8" });
	}
	const disc = isNum(chart.discrepancy) ? chart.discrepancy.toFixed(3) : "n/a";
	text(ctx, trunc(`${chart.label ?? ""}: ${chart.axis ?? ""} shares · discrepancy ${disc}`, 80), 6, 13,
		{ font: "bold 11px sans-serif" });
	// legend (wraps)
	let lx = 6;
	let ly = 27;
	const items = [...series.map((s) => ({ name: trunc(s.name, 28), color: s.color })), { name: "target", dash: true }];
	ctx.font = "10px sans-serif";
	for (const it of items) {
		const w = 14 + ctx.measureText(it.name).width + 10;
		if (lx + w > W - 4 && lx > 6) {
			lx = 6;
			ly += 13;
		}
		if (it.dash) {
			ctx.strokeStyle = "#ffffff";
			ctx.setLineDash([3, 2]);
			ctx.beginPath();
			ctx.moveTo(lx, ly - 3);
			ctx.lineTo(lx + 10, ly - 3);
			ctx.stroke();
			ctx.setLineDash([]);
		} else {
			ctx.fillStyle = it.color;
			ctx.fillRect(lx, ly - 8, 10, 8);
		}
		text(ctx, it.name, lx + 14, ly, { font: "10px sans-serif", color: "#cccccc" });
		lx += w;
	}
	// plot area
	const left = 30;
	const right = W - 6;
	const top = ly + 8;
	const bottom = H - 16;
	if (bottom - top < 20) return;
	const y = (v) => bottom - Math.max(0, Math.min(1, v)) * (bottom - top);
	ctx.lineWidth = 1;
	for (const g of [0, 0.25, 0.5, 0.75, 1]) {
		ctx.strokeStyle = GRID;
		ctx.beginPath();
		ctx.moveTo(left, Math.round(y(g)) + 0.5);
		ctx.lineTo(right, Math.round(y(g)) + 0.5);
		ctx.stroke();
		text(ctx, g.toFixed(2), left - 3, y(g) + 3, { align: "right", font: "9px sans-serif", color: "#999" });
	}
	const groupW = (right - left) / classes.length;
	const barW = Math.max(2, (groupW * 0.8) / series.length);
	classes.forEach((cls, c) => {
		const gx = left + c * groupW + groupW * 0.1;
		series.forEach((s, k) => {
			const v = isNum(s.values?.[c]) ? s.values[c] : 0;
			ctx.fillStyle = s.color;
			ctx.fillRect(gx + k * barW, y(v), Math.max(1, barW - 1), bottom - y(v));
		});
		const t = chart.target?.[c];
		if (isNum(t)) {
			ctx.strokeStyle = "#ffffff";
			ctx.setLineDash([4, 3]);
			ctx.beginPath();
			ctx.moveTo(gx - 2, y(t));
			ctx.lineTo(gx + groupW * 0.8 + 2, y(t));
			ctx.stroke();
			ctx.setLineDash([]);
		}
		text(ctx, trunc(cls, Math.max(4, Math.floor(groupW / 6))), left + c * groupW + groupW / 2, H - 4,
			{ align: "center", font: "10px sans-serif" });
	});
}

function setupChartNode(node) {
	node.popalignChart = node.popalignChart ?? null;
	node.popalignChartWidget = makeCanvasWidget(node, "popalign_chart", () => (node.popalignChart ? CHART_H : IDLE_H),
		(ctx, w, h) => paintChart(node, ctx, w, h));
}

app.registerExtension({
	name: "PopAlign.BiasChart",
	async beforeRegisterNodeDef(nodeType, nodeData) {
		if (nodeData?.name !== "PopAlignBiasMetrics") return;
		patchNodeType(nodeType);
		const onNodeCreated = nodeType.prototype.onNodeCreated;
		nodeType.prototype.onNodeCreated = function () {
			const r = onNodeCreated?.apply(this, arguments);
			setupChartNode(this);
			return r;
		};
		const onExecuted = nodeType.prototype.onExecuted;
		nodeType.prototype.onExecuted = function (output) {
			const r = onExecuted?.apply(this, arguments);
			const charts = output?.popalign_chart;
			if (Array.isArray(charts) && charts.length) {
				this.popalignChart = charts[charts.length - 1];
				refit(this);
				this.popalignChartWidget?.popalignRedraw();
			}
			return r;
		};
	},
});

// ---------------------------------------------------------------------------------- (b) target distribution editor
/** Shares of one axis ({class: p} or [p, ...]) as [[name, p], ...]; null when it is not editable. */
function axisEntries(spec) {
	if (Array.isArray(spec)) return spec.every(isNum) ? spec.map((v, i) => [String(i), v]) : null;
	if (spec && typeof spec === "object") {
		const e = Object.entries(spec);
		return e.length && e.every(([, v]) => isNum(v)) ? e : null;
	}
	return null;
}

/** The axis with class `idx` set to `value` and the others rescaled proportionally; sums to exactly 1. */
export function rebalance(values, idx, value) {
	const n = values.length;
	if (n === 1) return [1];
	const v = Math.max(0, Math.min(1, Number(value) || 0));
	const rest = values.reduce((a, b, j) => (j === idx ? a : a + Math.max(0, b)), 0);
	const out = values.map((b, j) => {
		if (j === idx) return v;
		return rest > 1e-12 ? (Math.max(0, b) * (1 - v)) / rest : (1 - v) / (n - 1); // all others 0: share equally
	});
	// 4-decimal units that sum to exactly UNIT; the rounding remainder goes to the largest other class
	const units = out.map((x) => Math.round(x * UNIT));
	let diff = UNIT - units.reduce((a, b) => a + b, 0);
	if (diff !== 0) {
		const order = units.map((u, j) => j).filter((j) => j !== idx).sort((a, b) => units[b] - units[a]);
		for (const j of [...order, idx]) {
			const next = units[j] + diff;
			if (next >= 0) {
				units[j] = next;
				diff = 0;
				break;
			}
		}
	}
	return units.map((u) => u / UNIT);
}

function formatJson(value) {
	const inline = (v) => {
		if (Array.isArray(v)) return `[${v.map(inline).join(", ")}]`;
		if (v && typeof v === "object") {
			return `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${inline(x)}`).join(", ")}}`;
		}
		return JSON.stringify(v);
	};
	const keys = value && typeof value === "object" && !Array.isArray(value) ? Object.keys(value) : [];
	if (keys.length <= 1) return inline(value);
	return `{\n${keys.map((k) => `  ${JSON.stringify(k)}: ${inline(value[k])}`).join(",\n")}\n}`;
}

function parseJson(textValue, empty) {
	const s = String(textValue ?? "").trim();
	if (!s) return { value: empty };
	try {
		return { value: JSON.parse(s) };
	} catch (err) {
		return { error: `invalid JSON: ${err.message}` };
	}
}

const LINE_H = { "pa-title": 16, "pa-axis": 16, "pa-note": 16, "pa-joint": 16, "pa-row": 20 }; // as in the CSS
const SECTION_GAP = 4;

function addLine(parent, cls, content) {
	const el = document.createElement("div");
	el.className = cls;
	if (content != null) {
		el.textContent = content;
		el.title = content;
	}
	parent.append(el);
	return [el, LINE_H[cls.split(" ")[0]] || 16];
}

/** One editor section: the sliders of one target ({axis: shares}); `write(spec)` stores the edited target.
 * Returns its height in px (the editor's size is computed, not measured: the element may be hidden). */
function buildSection(parent, title, spec, prompt, write) {
	const sec = document.createElement("div");
	sec.className = "pa-section";
	if (prompt != null) sec.dataset.prompt = prompt;
	parent.append(sec);
	let px = SECTION_GAP;
	const add = (cls, content) => {
		const [el, h] = addLine(sec, cls, content);
		px += h;
		return el;
	};
	if (title != null) add("pa-title", title);
	if (!spec || typeof spec !== "object" || Array.isArray(spec)) {
		add("pa-note pa-error", "expected a JSON object {axis: {class: share}}");
		return px;
	}
	if ("joint" in spec) {
		add("pa-note", "joint target: read-only here, edit the JSON");
		const probs = spec.joint?.probs && typeof spec.joint.probs === "object" ? spec.joint.probs : {};
		if (Array.isArray(spec.joint?.axes)) add("pa-joint", `axes: ${spec.joint.axes.join(" | ")}`);
		const entries = Object.entries(probs);
		for (const [k, p] of entries.slice(0, 12)) {
			add("pa-joint", `${k}: ${isNum(p) ? p.toFixed(DIGITS) : JSON.stringify(p)}`).dataset.joint = k;
		}
		if (entries.length > 12) add("pa-joint", `… ${entries.length - 12} more`);
		return px;
	}
	const sliders = [];
	for (const axis of Object.keys(spec)) {
		const entries = axisEntries(spec[axis]);
		const sum = entries ? entries.reduce((a, [, v]) => a + v, 0) : 0;
		const head = add("pa-axis", entries && Math.abs(sum - 1) > 1e-6
			? `${axis} (sums to ${sum.toFixed(DIGITS)}: move a slider to rescale)` : axis);
		head.dataset.axis = axis;
		if (!entries) {
			add("pa-note pa-error", `${axis}: expected {class: share} with numbers`);
			continue;
		}
		entries.forEach(([cls, v], idx) => {
			const row = add("pa-row");
			const label = document.createElement("label");
			label.textContent = cls;
			label.title = cls;
			const input = document.createElement("input");
			input.type = "range";
			input.min = "0";
			input.max = "1";
			input.step = String(1 / UNIT);
			input.value = String(v);
			input.dataset.axis = axis;
			input.dataset.class = cls;
			if (prompt != null) input.dataset.prompt = prompt;
			const val = document.createElement("span");
			val.className = "pa-val";
			val.textContent = v.toFixed(3);
			row.append(label, input, val);
			const onInput = () => {
				const current = axisEntries(spec[axis]);
				if (!current) return;
				const next = rebalance(current.map(([, x]) => x), idx, parseFloat(input.value));
				spec[axis] = Array.isArray(spec[axis])
					? next : Object.fromEntries(current.map(([c], j) => [c, next[j]]));
				for (const s of sliders) {
					if (s.axis !== axis) continue;
					s.input.value = String(next[s.idx]);
					s.val.textContent = next[s.idx].toFixed(3);
				}
				head.textContent = axis;
				write(spec);
			};
			input.addEventListener("input", onInput);
			input.addEventListener("change", onInput);
			sliders.push({ axis, idx, input, val });
		});
	}
	return px;
}

function setupTargetNode(node) {
	const box = document.createElement("div");
	box.className = "popalign-widget popalign-editor";
	const state = { px: 40, seen: {}, written: {} };
	const height = () => Math.min(state.px + 6, 420) + 20; // + padding; + the DOM widget's margins
	const widget = addPopAlignWidget(node, "popalign_target_editor", box, height);
	node.popalignEditor = { element: box, widget };

	const textWidgets = () => ({ target_json: findWidget(node, "target_json"),
		prompt_targets_json: findWidget(node, "prompt_targets_json") });

	function writer(name, wholeValue) {
		return () => {
			const w = textWidgets()[name];
			if (!w) return;
			const s = formatJson(wholeValue);
			state.written[name] = s;
			state.seen[name] = s;
			w.value = s; // the text widget's setter updates its textarea (and calls its callback)
			app.graph?.setDirtyCanvas?.(true, false);
		};
	}

	function render(force) {
		const ws = textWidgets();
		const texts = { target_json: ws.target_json?.value, prompt_targets_json: ws.prompt_targets_json?.value };
		if (!force && texts.target_json === state.seen.target_json
			&& texts.prompt_targets_json === state.seen.prompt_targets_json) return; // nothing new (or our write)
		state.seen = { ...texts };
		box.replaceChildren();
		let px = 0;
		const note = (content) => (px += addLine(box, "pa-note pa-error", content)[1]);
		// the target
		if (!ws.target_json || ws.target_json.type === "converted-widget") {
			note("target_json is an input: edit it where it comes from");
		} else {
			const parsed = parseJson(texts.target_json, {});
			if (parsed.error) note(`target_json: ${parsed.error}`);
			else px += buildSection(box, "target", parsed.value, null, writer("target_json", parsed.value));
		}
		// conditional targets, one row per prompt
		if (ws.prompt_targets_json && ws.prompt_targets_json.type !== "converted-widget") {
			const parsed = parseJson(texts.prompt_targets_json, {});
			const pt = parsed.value;
			if (parsed.error || !pt || typeof pt !== "object" || Array.isArray(pt)) {
				note(`prompt_targets_json: ${parsed.error || "expected {prompt: {axis: {class: share}}}"}`);
			} else {
				const write = writer("prompt_targets_json", pt);
				for (const prompt of Object.keys(pt)) {
					px += buildSection(box, `prompt: ${prompt}`, pt[prompt], prompt, (edited) => {
						pt[prompt] = edited;
						write();
					});
				}
			}
		}
		const changed = px !== state.px;
		state.px = px;
		if (changed) refit(node);
	}
	node.popalignEditor.render = render;

	// text -> sliders: the text widgets' callbacks (typing, loading, setting .value) and, as a fallback, each draw
	for (const w of Object.values(textWidgets())) {
		if (!w) continue;
		const cb = w.callback;
		w.callback = function () {
			const r = cb?.apply(this, arguments);
			render(false);
			return r;
		};
		const el = w.inputEl || w.element;
		el?.addEventListener?.("input", () => render(false));
	}
	widget.options.onDraw = () => render(false);
	render(true);
}

app.registerExtension({
	name: "PopAlign.TargetEditor",
	async beforeRegisterNodeDef(nodeType, nodeData) {
		if (nodeData?.name !== "PopAlignTargetDistribution") return;
		patchNodeType(nodeType);
		const onNodeCreated = nodeType.prototype.onNodeCreated;
		nodeType.prototype.onNodeCreated = function () {
			const r = onNodeCreated?.apply(this, arguments);
			setupTargetNode(this);
			return r;
		};
		const onConfigure = nodeType.prototype.onConfigure;
		nodeType.prototype.onConfigure = function () {
			const r = onConfigure?.apply(this, arguments);
			this.popalignEditor?.render(true); // widgets_values were just loaded
			return r;
		};
	},
});

// --------------------------------------------------------------------------------------------- (c) loss curve
const LOSS_NODES = new Set(["PopAlignLoRATrainer", "PopAlignDistributionalAlignment"]);

function paintLoss(node, ctx, W, H) {
	const data = node.popalignLoss;
	const pts = (data?.points || []).filter((p) => isNum(p.step) && isNum(p.loss));
	if (!pts.length) {
		text(ctx, data ? "training: waiting for the first step" : "loss curve: run the workflow", W / 2, H / 2 + 4,
			{ align: "center", color: "#999" });
		return;
	}
	const last = pts[pts.length - 1];
	const total = Math.max(data.total || 0, last.step);
	const status = data.final ? "done" : "live";
	text(ctx, trunc(`loss · step ${last.step}/${total} · ${last.loss.toPrecision(4)} (${status})`, 70), 6, 13,
		{ font: "bold 11px sans-serif" });
	let lo = Math.min(...pts.map((p) => p.loss));
	let hi = Math.max(...pts.map((p) => p.loss));
	if (hi - lo < 1e-12) {
		lo -= 0.5 * Math.abs(lo || 1);
		hi += 0.5 * Math.abs(hi || 1);
	}
	const left = 44;
	const right = W - 8;
	const top = 22;
	const bottom = H - 16;
	if (bottom - top < 10) return;
	const x0 = Math.min(pts[0].step, 1);
	const x = (s) => left + ((s - x0) / Math.max(1e-9, total - x0)) * (right - left);
	const y = (v) => bottom - ((v - lo) / (hi - lo)) * (bottom - top);
	ctx.lineWidth = 1;
	for (const f of [0, 0.5, 1]) {
		const v = lo + f * (hi - lo);
		ctx.strokeStyle = GRID;
		ctx.beginPath();
		ctx.moveTo(left, Math.round(y(v)) + 0.5);
		ctx.lineTo(right, Math.round(y(v)) + 0.5);
		ctx.stroke();
		text(ctx, v.toPrecision(3), left - 3, y(v) + 3, { align: "right", font: "9px sans-serif", color: "#999" });
	}
	text(ctx, String(x0), left, H - 4, { font: "9px sans-serif", color: "#999" });
	text(ctx, String(total), right, H - 4, { align: "right", font: "9px sans-serif", color: "#999" });
	ctx.strokeStyle = COLORS[1];
	ctx.lineWidth = 1.5;
	ctx.beginPath();
	pts.forEach((p, i) => (i ? ctx.lineTo(x(p.step), y(p.loss)) : ctx.moveTo(x(p.step), y(p.loss))));
	ctx.stroke();
	if (pts.length <= 60) {
		ctx.fillStyle = COLORS[1];
		for (const p of pts) ctx.fillRect(x(p.step) - 1.5, y(p.loss) - 1.5, 3, 3);
	}
}

function setupLossNode(node) {
	node.popalignLoss = node.popalignLoss ?? null;
	node.popalignLossWidget = makeCanvasWidget(node, "popalign_loss", () => (node.popalignLoss ? LOSS_H : IDLE_H),
		(ctx, w, h) => paintLoss(node, ctx, w, h));
}

function onLossEvent(event) {
	const d = event?.detail;
	if (!d || d.node == null) return;
	const node = nodeById(d.node);
	if (!node || !LOSS_NODES.has(node.comfyClass || node.type) || !node.popalignLossWidget) return;
	let data = node.popalignLoss;
	const step = Number(d.step);
	const last = data?.points?.[data.points.length - 1];
	const fresh = !data || data.final || (last && step <= last.step);
	if (fresh) data = node.popalignLoss = { points: [], total: 0, live: 0, final: false };
	if (isNum(step) && isNum(d.loss)) data.points.push({ step, loss: d.loss });
	data.total = Number(d.total) || data.total;
	data.live += 1;
	data.metrics = d.metrics || null;
	if (fresh) refit(node);
	node.popalignLossWidget.popalignRedraw();
}

app.registerExtension({
	name: "PopAlign.LossCurve",
	setup() {
		api.addEventListener("popalign.loss", onLossEvent);
	},
	async beforeRegisterNodeDef(nodeType, nodeData) {
		if (!LOSS_NODES.has(nodeData?.name)) return;
		patchNodeType(nodeType);
		const onNodeCreated = nodeType.prototype.onNodeCreated;
		nodeType.prototype.onNodeCreated = function () {
			const r = onNodeCreated?.apply(this, arguments);
			setupLossNode(this);
			return r;
		};
		const onExecuted = nodeType.prototype.onExecuted;
		nodeType.prototype.onExecuted = function (output) {
			const r = onExecuted?.apply(this, arguments);
			const entries = output?.popalign_loss;
			const rows = Array.isArray(entries) && entries.length ? entries[entries.length - 1].rows : null;
			if (Array.isArray(rows)) {
				const prev = this.popalignLoss;
				const points = rows.filter((row) => isNum(row?.step) && isNum(row?.loss))
					.map((row) => ({ step: row.step, loss: row.loss }));
				const lastStep = points.length ? points[points.length - 1].step : 0;
				this.popalignLoss = { points, total: Math.max(prev?.total || 0, lastStep), live: prev?.live || 0,
					final: true, metrics: prev?.metrics || null };
				refit(this);
				this.popalignLossWidget?.popalignRedraw();
			}
			return r;
		};
	},
});

// ------------------------------------------------------------------------------------------ loss defaults
// Switching the trainer's loss fills `loss_params` with that loss's own default hyper-parameters (GET
// /popalign/losses, the core's registry). Only a user's change does this: a loaded workflow keeps its values.
let lossDefaults = null;

export async function fetchLossDefaults() {
	if (!lossDefaults) {
		const resp = await api.fetchApi("/popalign/losses", { cache: "no-store" });
		if (!resp.ok) throw new Error(`${TAG} GET /popalign/losses: HTTP ${resp.status}`);
		lossDefaults = await resp.json();
	}
	return lossDefaults;
}

function setupLossDefaults(node) {
	const loss = findWidget(node, "loss");
	const params = findWidget(node, "loss_params");
	if (!loss || !params) return;
	const callback = loss.callback;
	loss.callback = function (value) {
		const r = callback?.apply(this, arguments);
		fetchLossDefaults()
			.then((all) => {
				const entry = all?.[loss.value];
				if (!entry) return;
				params.value = JSON.stringify(entry.defaults, null, 2);
				node.popalignLossDefaults = { loss: loss.value, defaults: entry.defaults };
				app.graph?.setDirtyCanvas(true, false);
			})
			.catch((err) => console.warn(`${TAG} ${err}`));
		return r;
	};
}

app.registerExtension({
	name: "PopAlign.LossDefaults",
	async beforeRegisterNodeDef(nodeType, nodeData) {
		if (nodeData?.name !== "PopAlignLoRATrainer") return;
		const onNodeCreated = nodeType.prototype.onNodeCreated;
		nodeType.prototype.onNodeCreated = function () {
			const r = onNodeCreated?.apply(this, arguments);
			setupLossDefaults(this);
			return r;
		};
	},
});
