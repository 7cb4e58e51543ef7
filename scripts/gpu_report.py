#!/usr/bin/env python
"""Merge the logs of scripts/gpu_check.sh into one JSON: each step's rc and time, the JSON each
benchmark printed, the GPU tests' counts (from JUnit XML), the environment, and a summary."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def last_json(text: str):
    """The last JSON object a benchmark printed (they print one, maybe after log lines)."""
    start = text.rfind("\n{")
    for pos in ([start + 1] if start >= 0 else []) + [0]:
        try:
            return json.loads(text[pos:])
        except ValueError:
            continue
    return None


def junit(path: Path) -> dict:
    if not path.exists():
        return {"error": "no junit xml"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = {"passed": [], "failed": [], "skipped": []}
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            cases["failed"].append({"test": name, "message": (node.get("message") or "")[:400]})
        elif case.find("skipped") is not None:
            cases["skipped"].append({"test": name, "reason": (case.find("skipped").get("message") or "")[:200]})
        else:
            cases["passed"].append(name)
    return {"passed": len(cases["passed"]), "failed": cases["failed"], "skipped": cases["skipped"],
            "passed_tests": cases["passed"]}


def main() -> None:
    out = Path(sys.argv[1])
    report: dict = {"total_seconds": int(sys.argv[2]) if len(sys.argv) > 2 else None}
    env = out / "environment.json"
    report["environment"] = json.loads(env.read_text()) if env.exists() and env.stat().st_size else None
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()] \
        if (out / "steps.jsonl").exists() else []
    report["steps"] = steps
    for s in steps:
        log = out / f"{s['step']}.log"
        if s["step"] == "gpu_tests":
            report["gpu_tests"] = junit(out / "gpu_tests.xml")
        elif log.exists():
            text = log.read_text(errors="replace")
            report[s["step"]] = last_json(text) or {"rc": s.get("rc"), "log_tail": text[-1500:]}
    summary = {"gpu": (report["environment"] or {}).get("gpu"),
               "steps": {s["step"]: s.get("rc") for s in steps},
               "gpu_tests": {k: (len(v) if isinstance(v, list) else v)
                             for k, v in report.get("gpu_tests", {}).items() if k != "passed_tests"}}
    report["summary"] = summary
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
