"""The front-end extension (js/popalign.js) in a real browser against a real ComfyUI server.

Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by Selenium opens each ComfyUI of the test
matrix (tests/comfy_support.py) with this repository in ``custom_nodes/``: the legacy LiteGraph frontend of the 2024
copy, and ComfyUI 0.3.75's Vue frontend (``comfyui-frontend-package==1.32.9``) twice, with the classic canvas
renderer and with "Nodes 2.0" (setting ``Comfy.VueNodes.Enabled``: nodes drawn as Vue components). The page loads the
pack's JS like a user's browser does. The graphs are queued from the page (``app.queuePrompt``), so the widgets get
their data through the real ``executed`` and ``popalign.loss`` websocket messages. Skipped when the browser, its
driver or selenium is missing.

``POPALIGN_WRITE_SCREENSHOTS=1`` (re)writes, from the current frontend: docs/images/workflows/<name>.png (canvas
renderer), docs/images/workflows/nodes2/<name>.png (Nodes 2.0) and the Templates-browser thumbnails
example_workflows/<name>.jpg.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import make_workflows as mw  # noqa: E402
import pytest
import test_comfyui_nodes as tn  # noqa: E402  (shrink(), api_workflow(), TINY)

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "example_workflows"
SHOTS = REPO / "docs" / "images" / "workflows"
# the Vue frontend asks the Comfy registry which pack provides each non-core node of a loaded graph; this machine is
# offline (a user's browser gets an answer): not a problem of the pack
OFFLINE = re.compile(r"https://api\.comfy\.org/\S* - Failed to load resource: net::ERR_NAME_NOT_RESOLVED")
THUMB_SIZE = (480, 300)  # the Templates browser's cards show a 16:10 image
RENDERERS = ("canvas", "vue-nodes")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get install -y chromium chromium-driver && .venv/bin/pip install selenium"
EXTENSIONS = ("PopAlign.BiasChart", "PopAlign.TargetEditor", "PopAlign.LossCurve", "PopAlign.LossDefaults")
BG = (27, 27, 27)  # the widgets' canvas background (#1b1b1b in js/popalign.js)
pytestmark = pytest.mark.timeout(900)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def browser_available():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (Path(p).is_file() and os.access(p, os.X_OK))]
    if importlib.util.find_spec("selenium") is None:
        missing.append("selenium")
    if missing:
        pytest.skip(f"no headless browser ({', '.join(missing)} missing): {INSTALL}")


@pytest.fixture(scope="module")
def server(comfy_pack_server):
    return comfy_pack_server


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info", timeout=60)


class Page:
    """The ComfyUI page in headless Chromium: async JS calls and the browser's console log."""

    def __init__(self, driver):
        self.driver = driver
        self.logs: list[dict] = []

    def js(self, body: str, *args, timeout: float = 60):
        """Run `body` as an async function (arguments: `args`); its return value (JSON-able)."""
        self.driver.set_script_timeout(timeout)
        script = (
            "const done = arguments[arguments.length - 1];"
            "const args = Array.prototype.slice.call(arguments, 0, -1);"
            f"(async (...args) => {{ {body} }})(...args)"
            ".then((v) => done({ok: v === undefined ? null : v}), (e) => done({err: String((e && e.stack) || e)}));"
        )
        out = self.driver.execute_async_script(script, *args)
        if out is None or "err" in out:
            raise AssertionError(f"JS failed: {out and out['err']}")
        return out.get("ok")

    def wait_for(self, body: str, *args, timeout: float = 120, what: str = "condition"):
        deadline = time.time() + timeout
        while time.time() < deadline:
            errors = self.js("return window.__paErrors || [];")
            assert not errors, f"execution failed while waiting for {what}: {json.dumps(errors)[:3000]}"
            value = self.js(body, *args)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def popalign_problems(self) -> list[str]:
        """Console errors and warnings about this pack (its files, extension names, websocket events) so far."""
        self.logs += self.driver.get_log("browser")
        return [
            f"{e['level']}: {e['message']}"
            for e in self.logs
            if e["level"] in ("SEVERE", "WARNING")
            and "popalign" in e["message"].lower()
            and not OFFLINE.search(e["message"])
        ]

    def load(self, ui: dict) -> None:
        """Load a UI-format graph as a user does; fails on missing node types, a missing-nodes dialog, or a node
        whose widgets do not take exactly its saved widgets_values."""
        problems = self.js(
            "window.__paErrors = []; await app.loadGraphData(args[0]);"
            "await new Promise((ok) => setTimeout(ok, 100));"
            "const out = [];"
            "for (const n of app.graph._nodes) {"
            "  if (n.has_errors || !(n.type in LiteGraph.registered_node_types))"
            "    out.push(`${n.id} ${n.type}: missing`);"
            "  const saved = args[0].nodes.find((x) => x.id === n.id);"
            "  const ours = n.popalignWidgets || [];"
            "  const vals = (n.widgets || []).filter((w) => w.serialize !== false && !ours.includes(w));"
            "  if (saved && saved.widgets_values && vals.length !== saved.widgets_values.length)"
            "    out.push(`${n.id} ${n.type}: ${vals.length} widgets for ${saved.widgets_values.length} values`);"
            "}"
            "for (const d of document.querySelectorAll('.p-dialog'))"
            "  if (/missing nodes/i.test(d.textContent)) out.push('dialog: ' + d.textContent.slice(0, 200));"
            "return out;",
            ui,
        )
        assert not problems, problems

    def queue(self) -> None:
        self.js("window.__paErrors = []; await app.queuePrompt(0, 1);")
        errors = self.js("const e = app.lastNodeErrors; return e && Object.keys(e).length ? e : null;")
        assert not errors, f"ComfyUI rejected the prompt: {json.dumps(errors)[:3000]}"


@pytest.fixture(scope="module", params=RENDERERS)
def renderer(request, server) -> str:
    """How nodes are drawn: "canvas" (LiteGraph, both frontends) or "vue-nodes" (Nodes 2.0, the Vue frontend)."""
    if request.param == "vue-nodes" and server.frontend == "legacy":
        pytest.skip("the legacy frontend has no Nodes 2.0")
    return request.param


def _settings(server, renderer: str) -> None:
    """The Vue frontend's user settings, stored on the server before the page loads: no first-run Templates dialog,
    the renderer under test, no layout rescaling when it switches (tests compare sizes), no low-detail drawing of
    zoomed-out nodes (the screenshots fit whole graphs)."""
    if server.frontend != "vue":
        return
    settings = {"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": renderer == "vue-nodes",
                "Comfy.VueNodes.AutoScaleLayout": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}  # fmt: skip
    for key, value in settings.items():
        server.post(f"/api/settings/{key}", value)


@pytest.fixture(scope="module")
def page(server, renderer, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _settings(server, renderer)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium_profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1600,1000", "--force-device-scale-factor=1",
                f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_window_size(1600, 1000)
        driver.get(server.url)
        p = Page(driver)
        deadline = time.time() + 60
        while not driver.execute_script("return !!(window.app && window.app.graph && window.app.canvas);"):
            assert time.time() < deadline, "the ComfyUI page did not start"
            time.sleep(0.2)
        p.js(
            "window.__paErrors = [];"
            "const {api} = await import('/scripts/api.js');"
            "api.addEventListener('execution_error', (e) => window.__paErrors.push(e.detail));"
        )
        p.frontend, p.renderer = server.frontend, renderer
        assert p.js("return globalThis.LiteGraph?.vueNodesMode === true;") == (renderer == "vue-nodes")
        yield p
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def node_expr(node_id) -> str:
    return f"app.graph.getNodeById({int(node_id)})"


def canvas_stats(page: Page, node_id, prop: str) -> dict:
    """Size of a widget canvas and how many of its pixels differ from the background."""
    return page.js(
        f"const c = {node_expr(node_id)}[args[0]].popalignCanvas;"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let fg = 0; const colors = new Set();"
        "for (let i = 0; i < d.length; i += 4) {"
        "  if (Math.abs(d[i] - args[1]) + Math.abs(d[i+1] - args[2]) + Math.abs(d[i+2] - args[3]) > 24) fg++;"
        "  if (colors.size < 100) colors.add(d[i] << 16 | d[i+1] << 8 | d[i+2]);"
        "}"
        "return {w: c.width, h: c.height, fg, colors: colors.size};",
        prop,
        *BG,
    )


def _graph_screenshot(page: Page) -> bytes:
    """The whole graph fitted in view, without the frontend's menus, as PNG bytes."""
    from selenium.webdriver.common.by import By

    if page.frontend == "vue":  # focus mode hides menus, tabs and sidebars; the frontend's own zoom-to-fit
        page.js(
            "const ws = app.extensionManager; app.canvas.deselectAll?.(); app.canvas.show_info = false;"
            "if (!ws.focusMode) await ws.command.execute('Workspace.ToggleFocusMode');"
            "await ws.command.execute('Comfy.Canvas.FitView');"
            "app.canvas.setDirty(true, true);"
            "await new Promise((ok) => requestAnimationFrame(() => requestAnimationFrame(ok)));"
            "await new Promise((ok) => setTimeout(ok, 500));"
        )
        png = page.driver.get_screenshot_as_png()
        page.graph_box = page.js(
            "const T = LiteGraph.NODE_TITLE_HEIGHT, ds = app.canvas.ds, r = app.canvasEl.getBoundingClientRect();"
            "let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;"
            "for (const n of app.graph._nodes) { x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - T);"
            "  x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]); }"
            "const sx = (x) => r.left + (x + ds.offset[0]) * ds.scale;"
            "const sy = (y) => r.top + (y + ds.offset[1]) * ds.scale;"
            "return [sx(x0), sy(y0), sx(x1), sy(y1)].map(Math.round);"
        )
        page.js(
            "const ws = app.extensionManager; if (ws.focusMode) await ws.command.execute('Workspace.ToggleFocusMode');"
        )
        return png
    page.js(
        "const T = LiteGraph.NODE_TITLE_HEIGHT; let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;"
        "for (const n of app.graph._nodes) { x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - T);"
        "  x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]); }"
        "const r = app.canvasEl.getBoundingClientRect(); const pad = 20;"
        "const s = Math.min(1, (r.width - 2 * pad) / (x1 - x0), (r.height - 2 * pad) / (y1 - y0));"
        "app.canvas.ds.scale = s;"
        "app.canvas.ds.offset = [(r.width / s - (x1 - x0)) / 2 - x0, (r.height / s - (y1 - y0)) / 2 - y0];"
        "const menu = document.querySelector('.comfy-menu'); if (menu) menu.style.display = 'none';"
        "app.canvas.show_info = false;"
        "app.canvas.selectNodes?.([]); app.canvas.deselectAllNodes?.();"
        "app.canvas.setDirty(true, true); app.canvas.draw(true, true);"
        "await new Promise((ok) => requestAnimationFrame(() => requestAnimationFrame(ok)));"
        "app.canvas.draw(true, true); await new Promise((ok) => setTimeout(ok, 300));"
    )
    png = page.driver.find_element(By.ID, "graph-canvas").screenshot_as_png
    page.js(
        "const m = document.querySelector('.comfy-menu'); if (m) m.style.display = ''; app.canvas.show_info = true;"
    )
    return png


def _write_run_screenshot(page: Page, name: str) -> None:
    """With POPALIGN_WRITE_SCREENSHOTS=1 in the Vue frontend: the graph after a run from the page, as
    docs/images/workflows/run/<name>.png (canvas renderer) or docs/images/workflows/nodes2/run_<name>.png."""
    if os.environ.get("POPALIGN_WRITE_SCREENSHOTS") != "1" or page.frontend != "vue":
        return
    from PIL import Image

    img = Image.open(io.BytesIO(_graph_screenshot(page))).convert("RGB")
    path = SHOTS / "run" / f"{name}.png" if page.renderer == "canvas" else SHOTS / "nodes2" / f"run_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)


def _thumbnail(img, box):
    """The part of the screenshot `img` around the graph (`box`: its screen box), padded to the THUMB_SIZE aspect
    and scaled to THUMB_SIZE."""
    from PIL import Image

    pad = 16
    x0, y0, x1, y1 = box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad
    tw, th = THUMB_SIZE
    w, h = x1 - x0, y1 - y0
    if w * th < h * tw:  # too tall: widen around the centre
        x0, w = x0 - (h * tw / th - w) / 2, h * tw / th
    else:
        y0, h = y0 - (w * th / tw - h) / 2, w * th / tw
    x0, y0 = max(0, min(x0, img.size[0] - w)), max(0, min(y0, img.size[1] - h))
    crop = img.crop((round(x0), round(y0), round(x0 + w), round(y0 + h)))
    return crop.resize(THUMB_SIZE, Image.LANCZOS)


def ui_of(api: dict, object_info: dict, title: str) -> dict:
    return mw.to_ui(api, object_info, title)


# -------------------------------------------------------------------------------------------------- the tests
def test_extension_loads(server, page):
    assert "/extensions/PopAlign/popalign.js" in server.get("/extensions")
    names = page.js("return app.extensions.map((e) => e.name);")
    for name in EXTENSIONS:
        assert name in names, names
    # the editor exists on a new node; the DOM widgets add no inputs to the API prompt
    ok = page.js(
        "const n = LiteGraph.createNode('PopAlignTargetDistribution'); app.graph.add(n);"
        "const sliders = n.popalignEditor.element.querySelectorAll('input[type=range]').length;"
        "const p = await app.graphToPrompt(); const inputs = Object.keys(p.output[String(n.id)].inputs).sort();"
        "app.graph.remove(n); return {sliders, inputs};"
    )
    assert ok == {"sliders": 2, "inputs": ["prompt_targets_json", "target_json"]}
    assert not page.popalign_problems()


def test_switching_the_loss_fills_its_default_hyper_parameters(page):
    from popalign_core.train.losses import loss_defaults

    got = page.js(
        "const n = LiteGraph.createNode('PopAlignLoRATrainer'); app.graph.add(n);"
        "const w = (name) => n.widgets.find((x) => x.name === name);"
        "const before = w('loss_params').value;"
        "w('loss').value = 'dpo'; w('loss').callback('dpo');"
        "const t0 = Date.now(); while (!n.popalignLossDefaults && Date.now() - t0 < 10000) "
        "  await new Promise((r) => setTimeout(r, 50));"
        "const after = w('loss_params').value; app.graph.remove(n); return {before, after};"
    )
    assert got["before"] == "{}"  # a new node starts from the loss's defaults, unwritten
    assert json.loads(got["after"]) == json.loads(json.dumps(loss_defaults("dpo")))
    assert not page.popalign_problems()


def test_bias_chart_renders_after_execution(page, object_info):
    api = tn.shrink(tn.api_workflow("bias_audit"))
    page.load(ui_of(api, object_info, "bias_audit"))
    assert page.js(f"return {node_expr(5)}.popalignChart;") is None
    idle = canvas_stats(page, 5, "popalignChartWidget")
    page.queue()
    chart = page.wait_for(f"return {node_expr(5)}.popalignChart;", timeout=300, what="the chart data")
    assert chart["axis"] == "gender" and chart["classes"] == ["female", "male"]
    assert chart["target"] == [0.5, 0.5] and len(chart["shares"]) == 2
    stats = canvas_stats(page, 5, "popalignChartWidget")
    assert stats["w"] > 100 and stats["h"] > 100, stats
    assert stats["fg"] > 1500 and stats["colors"] >= 5, stats  # bars, target lines, legend, labels
    assert stats["h"] > idle["h"]  # the widget grew from its placeholder
    size = page.js(f"const n = {node_expr(5)}; return [n.size[1], n.computeSize()[1]];")
    assert size[0] >= size[1]  # the node is as tall as its widgets need
    _write_run_screenshot(page, "bias_audit")
    assert not page.popalign_problems()


def _editor_state(page: Page, node_id: int = 4) -> dict:
    return page.js(
        f"const n = {node_expr(node_id)}; const box = n.popalignEditor.element;"
        "const sliders = [...box.querySelectorAll('input[type=range]')].map((s) => ({"
        "  axis: s.dataset.axis, cls: s.dataset.class, prompt: s.dataset.prompt ?? null, value: Number(s.value)}));"
        "const w = (name) => n.widgets.find((x) => x.name === name).value;"
        "return {sliders, target: w('target_json'), prompts: w('prompt_targets_json'), text: box.textContent};"
    )


def _move(page: Page, axis: str, cls: str, value: float, prompt: str | None = None, node_id: int = 4) -> None:
    page.js(
        f"const box = {node_expr(node_id)}.popalignEditor.element;"
        "const s = [...box.querySelectorAll('input[type=range]')].find((x) => x.dataset.axis === args[0]"
        "  && x.dataset.class === args[1] && (x.dataset.prompt ?? null) === args[3]);"
        "if (!s) throw new Error('no slider ' + args.join('/'));"
        "s.value = String(args[2]); s.dispatchEvent(new Event('input', {bubbles: true}));",
        axis,
        cls,
        value,
        prompt,
    )


def _type(page: Page, name: str, text: str, node_id: int = 4) -> None:
    """Type into a text widget as a user does (its textarea + an input event)."""
    page.js(
        f"const w = {node_expr(node_id)}.widgets.find((x) => x.name === args[0]);"
        "const el = w.inputEl || w.element; el.value = args[1];"
        "el.dispatchEvent(new Event('input', {bubbles: true}));",
        name,
        text,
    )


def _shares(state: dict, axis: str, prompt: str | None = None) -> dict:
    return {s["cls"]: s["value"] for s in state["sliders"] if s["axis"] == axis and s["prompt"] == prompt}


def test_target_editor_round_trips_values(page):
    ui = json.loads((WORKFLOWS / "distributional_alignment.json").read_text())
    page.load(ui)
    state = _editor_state(page)
    assert _shares(state, "gender") == {"female": 0.75, "male": 0.25}
    # slider -> JSON: the other class takes the rest
    _move(page, "gender", "female", 0.6)
    state = _editor_state(page)
    assert json.loads(state["target"]) == {"gender": {"female": 0.6, "male": 0.4}}
    assert _shares(state, "gender") == {"female": 0.6, "male": 0.4}
    # JSON -> sliders; a second axis with three classes rescales the others proportionally
    _type(page, "target_json", '{"gender": {"female": 0.5, "male": 0.5}, "race": {"a": 0.5, "b": 0.3, "c": 0.2}}')
    state = _editor_state(page)
    assert _shares(state, "race") == {"a": 0.5, "b": 0.3, "c": 0.2}
    _move(page, "race", "b", 0.5)
    target = json.loads(_editor_state(page)["target"])
    race = target["race"]
    assert race["b"] == 0.5 and abs(sum(race.values()) - 1) < 1e-9
    assert race["a"] == pytest.approx(0.5 * 0.5 / 0.7, abs=1e-4) and race["c"] == pytest.approx(
        0.2 * 0.5 / 0.7, abs=1e-4
    )
    assert target["gender"] == {"female": 0.5, "male": 0.5}  # other axes untouched
    # all other classes at 0: they share the rest equally
    _type(page, "target_json", '{"gender": {"female": 1, "male": 0, "other": 0}}')
    _move(page, "gender", "female", 0.4)
    assert json.loads(_editor_state(page)["target"]) == {"gender": {"female": 0.4, "male": 0.3, "other": 0.3}}
    # conditional targets: one row per prompt, written to prompt_targets_json
    prompt = "a photo of a female doctor"
    _type(page, "prompt_targets_json", json.dumps({prompt: {"gender": {"female": 1, "male": 0}}}))
    assert _shares(_editor_state(page), "gender", prompt) == {"female": 1, "male": 0}
    _move(page, "gender", "female", 0.8, prompt=prompt)
    state = _editor_state(page)
    assert json.loads(state["prompts"]) == {prompt: {"gender": {"female": 0.8, "male": 0.2}}}
    assert json.loads(state["target"]) == {"gender": {"female": 0.4, "male": 0.3, "other": 0.3}}
    # a joint target is read-only; broken JSON shows a note and is left as typed
    joint = {"joint": {"axes": ["gender", "race"], "probs": {"female|a": 0.5, "male|a": 0.5}}}
    _type(page, "target_json", json.dumps(joint))
    state = _editor_state(page)
    assert not [s for s in state["sliders"] if s["prompt"] is None] and "read-only" in state["text"]
    _type(page, "target_json", '{"gender": ')
    state = _editor_state(page)
    assert "invalid JSON" in state["text"] and state["target"] == '{"gender": '
    # setting the widget's value (what loading a workflow does) updates the sliders too
    page.js(f"{node_expr(4)}.widgets.find((x) => x.name === 'target_json').value = args[0];",
            '{"gender": {"female": 0.2, "male": 0.8}}')  # fmt: skip
    assert _shares(_editor_state(page), "gender") == {"female": 0.2, "male": 0.8}
    # save and load: widgets_values hold exactly the Python widgets; the API prompt has no extra inputs
    saved = page.js("return app.graph.serialize();")
    node = next(n for n in saved["nodes"] if n["id"] == 4)
    assert node["widgets_values"] == ['{"gender": {"female": 0.2, "male": 0.8}}', state["prompts"]]
    page.load(saved)
    assert _shares(_editor_state(page), "gender") == {"female": 0.2, "male": 0.8}
    again = page.js("return app.graph.serialize();")
    assert next(n for n in again["nodes"] if n["id"] == 4)["widgets_values"] == node["widgets_values"]
    inputs = page.js("const p = await app.graphToPrompt(); return Object.keys(p.output['4'].inputs).sort();")
    assert "popalign_target_editor" not in inputs
    assert not page.popalign_problems()


def test_loss_curve_receives_live_events(page, object_info):
    wf = tn.shrink(tn.api_workflow("popalign_train"))
    wf = {k: v for k, v in wf.items() if int(k) <= 8}
    # a name per renderer: the same graph again would be answered from ComfyUI's cache (no training, no events)
    wf["8"]["inputs"].update(lora_name=f"js_live_curve_{page.renderer.replace('-', '_')}", seed=7)
    page.load(ui_of(wf, object_info, "popalign_train"))
    page.js(
        "window.__paLoss = [];"
        "const {api} = await import('/scripts/api.js');"
        "if (!window.__paLossHooked) { window.__paLossHooked = true;"
        "  api.addEventListener('popalign.loss', (e) => window.__paLoss.push({detail: e.detail,"
        f"    node: JSON.parse(JSON.stringify({node_expr(8)}?.popalignLoss ?? null))}})); }}"
    )
    page.queue()
    final = page.wait_for(
        f"const d = {node_expr(8)}.popalignLoss; return d && d.final ? d : null;", timeout=600, what="training"
    )
    events = page.js("return window.__paLoss;")
    assert [e["detail"]["step"] for e in events] == [1, 2, 3]
    assert all(e["detail"]["node"] == "8" for e in events)
    # after each live event the node held one point per step so far (our listener runs before this one)
    assert [[p["step"] for p in e["node"]["points"]] for e in events] == [[1], [1, 2], [1, 2, 3]]
    assert all(not e["node"]["final"] for e in events)
    # then the node's final rows replaced them
    assert [p["step"] for p in final["points"]] == [1, 2, 3] and final["live"] == 3 and final["total"] == 3
    assert [p["loss"] for p in final["points"]] == pytest.approx([e["detail"]["loss"] for e in events], rel=1e-5)
    stats = canvas_stats(page, 8, "popalignLossWidget")
    assert stats["fg"] > 300 and stats["colors"] >= 3, stats
    _write_run_screenshot(page, "popalign_train")
    assert not page.popalign_problems()


def test_templates_browser_shows_the_workflows_with_their_thumbnails(page):
    if page.frontend != "vue":
        pytest.skip("the legacy frontend has no Templates browser")
    cards = page.wait_for(
        "const ws = app.extensionManager;"
        "if (!document.querySelector('[data-testid^=\"template-workflow-\"]'))"
        "  await ws.command.execute('Comfy.BrowseTemplates');"
        "const cards = [...document.querySelectorAll('[data-testid^=\"template-workflow-\"]')];"
        "const out = Object.fromEntries(cards.map((c) => [c.dataset.testid.slice(18),"
        "  [...c.querySelectorAll('img')].map((i) => ({src: i.src.slice(0, 5), w: i.naturalWidth}))]));"
        "const ok = Object.keys(out).length === args[0].length"
        "  && Object.values(out).every((imgs) => imgs.length && imgs.every((i) => i.src === 'blob:' && i.w > 0));"
        "return ok ? out : null;",
        sorted(mw.WORKFLOWS),
        timeout=30,
        what="the template cards with their thumbnails (blob: images, not the default picture)",
    )
    assert sorted(cards) == sorted(mw.WORKFLOWS)
    # opening one loads it like a user's click does (missing-nodes dialog enabled)
    types = page.wait_for(
        "const card = document.querySelector('[data-testid=\"template-workflow-bias_audit\"]');"
        "if (card) card.click(); await new Promise((ok) => setTimeout(ok, 500));"
        "if (document.querySelector('[data-testid^=\"template-workflow-\"]')) return null;"
        "return app.graph._nodes.map((n) => n.type).sort();",
        timeout=30,
        what="the template to open",
    )
    ui = json.loads((WORKFLOWS / "bias_audit.json").read_text())
    assert types == sorted(n["type"] for n in ui["nodes"])
    assert page.js("return app.graph._nodes.filter((n) => n.has_errors).length;") == 0
    assert not page.js("return [...document.querySelectorAll('.p-dialog')].map((d) => d.textContent).join(' ');")
    assert not page.popalign_problems()


@pytest.mark.parametrize("name", list(mw.WORKFLOWS))
def test_workflow_screenshot_and_round_trip(page, name):
    from PIL import Image, ImageStat

    if name in mw.FLUX_WORKFLOWS and page.frontend != "vue":
        pytest.skip(f"{name} uses nodes the 2024 ComfyUI does not have (FLUX: ComfyUI 0.3.x)")
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    page.load(ui)
    # saving the loaded workflow keeps every node's widgets_values (the DOM widgets add none)
    saved = page.js("return app.graph.serialize();")
    by_id = {n["id"]: n for n in saved["nodes"]}
    for n in ui["nodes"]:
        assert by_id[n["id"]]["widgets_values"] == n["widgets_values"], f"{name}: node {n['id']} ({n['type']})"
    png = _graph_screenshot(page)
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.size[0] >= 1200 and img.size[1] >= 700, img.size
    colors = img.getcolors(maxcolors=1 << 20) or []
    assert len(colors) > 200 and max(ImageStat.Stat(img).stddev) > 5, "the screenshot looks blank"
    if os.environ.get("POPALIGN_WRITE_SCREENSHOTS") == "1" and page.frontend == "vue":
        folder = SHOTS if page.renderer == "canvas" else SHOTS / "nodes2"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{name}.png", optimize=True)
        if page.renderer == "canvas":  # the Templates browser's card: the graph, cropped to 16:10
            _thumbnail(img, page.graph_box).save(WORKFLOWS / f"{name}.jpg", quality=85, optimize=True)
    assert not page.popalign_problems()
