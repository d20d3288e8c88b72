"""Run a ComfyUI API-format workflow headless over ComfyUI's HTTP API (Python standard library only).

    python examples/run_workflow.py example_workflows/api/bias_audit.api.json --server http://127.0.0.1:8188 \
        --set 1.ckpt_name=my_sd15.safetensors --set 4.neutral_per_prompt=100

--set NODE.INPUT=VALUE changes a widget value (VALUE is parsed as JSON when it can be: numbers, true/false, lists;
otherwise it is a string). The script POSTs the graph to /prompt, polls /history/<id> until it finished, prints
the outputs of every node (file names of saved images, PopAlign metrics and loss rows) as JSON, and exits 1 when
ComfyUI rejected the graph (its node_errors are printed) or the run failed (its error message is printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request


def _call(url: str, data: dict | None = None, timeout: float = 30) -> dict:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return {"http_error": e.code, **json.loads(raw)}
        except json.JSONDecodeError:
            return {"http_error": e.code, "body": raw.decode(errors="replace")}
    return json.loads(raw) if raw.strip() else {}


def apply_sets(workflow: dict, sets: list[str]) -> dict:
    for item in sets:
        key, sep, value = item.partition("=")
        node, dot, name = key.partition(".")
        if not sep or not dot or node not in workflow:
            raise SystemExit(f"--set {item!r}: expected NODE.INPUT=VALUE with a node id of the workflow")
        try:
            workflow[node]["inputs"][name] = json.loads(value)
        except json.JSONDecodeError:
            workflow[node]["inputs"][name] = value
    return workflow


def run(workflow: dict, server: str, timeout: float) -> int:
    answer = _call(server.rstrip("/") + "/prompt", {"prompt": workflow})
    if "prompt_id" not in answer:
        print(json.dumps(answer, indent=2))
        return 1
    if answer.get("node_errors"):
        print("some nodes were not run:", json.dumps(answer["node_errors"], indent=2), file=sys.stderr)
    pid = answer["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = _call(f"{server.rstrip('/')}/history/{pid}").get(pid)
        if entry is not None:
            status = entry.get("status", {})
            if status.get("status_str") == "error":
                errs = [
                    m[1] for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")
                ]
                print(json.dumps(errs, indent=2), file=sys.stderr)
                return 1
            print(json.dumps(entry.get("outputs", {}), indent=2))
            return 0
        time.sleep(0.5)
    print(f"prompt {pid} did not finish within {timeout:.0f} s", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow", help="API-format workflow (*.api.json)")
    ap.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", help="change an input")
    ap.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait for the run")
    args = ap.parse_args(argv)
    with open(args.workflow, encoding="utf-8") as f:
        workflow = json.load(f)
    return run(apply_sets(workflow, args.set), args.server, args.timeout)


if __name__ == "__main__":
    raise SystemExit(main())
