"""evaluate@1: set `result` (OK/NG) from declarative rules over the context; every rule must pass.

Each outcome is also listed in `context["evaluation"]`, so an operator can see why a part was NG.
"""

from __future__ import annotations

from typing import Any

from appliance.context import Context
from appliance.nodes.base import Node
from appliance.nodes.settings import EvaluateSettings, MaxRectangles, MinRectangles, NoRectangles, ScoreBelow, TopClass


def _label(rectangle: Any) -> Any:
    try:
        return rectangle["classNames"][0]["label"]
    except (KeyError, IndexError, TypeError):
        return None


def _count(ctx: Context, label: str | None) -> int:
    rectangles = ctx.get("detectedRectangles") or []
    return sum(1 for r in rectangles if label is None or _label(r) == label)


def _passes(rule: Any, ctx: Context) -> tuple[bool, str]:
    if isinstance(rule, NoRectangles):
        found = _count(ctx, rule.label)
        return found == 0, f"{found} rectangle(s)" + (f" labelled {rule.label!r}" if rule.label else "")
    if isinstance(rule, MaxRectangles):
        found = _count(ctx, rule.label)
        return found <= rule.count, f"{found} rectangle(s), at most {rule.count} allowed"
    if isinstance(rule, MinRectangles):
        found = _count(ctx, rule.label)
        return found >= rule.count, f"{found} rectangle(s), at least {rule.count} needed"
    if isinstance(rule, ScoreBelow):
        score, threshold = ctx.get("score"), rule.threshold if rule.threshold is not None else ctx.get("threshold")
        if not isinstance(score, (int, float)) or not isinstance(threshold, (int, float)):
            return False, "no score or threshold in the context (is there an anomaly node before this one?)"
        return score < threshold, f"score {score:.4g}, threshold {threshold:.4g}"
    if isinstance(rule, TopClass):
        results = [r for r in ctx.get("classification") or [] if rule.node is None or r.get("node") == rule.node]
        if not results:
            return False, "no classification in the context (is there a classify node before this one?)"
        predicted = results[-1].get("predicted") or []
        if not predicted:
            return False, "no label reached its threshold"
        top = predicted[0]["label_name"]
        return top in rule.labels, f"top class {top!r} ({predicted[0]['score']:.2f})"
    present = rule.key in ctx
    actual = ctx.get(rule.key)
    return present and actual == rule.value, f"{rule.key} is {actual!r}" if present else f"{rule.key} is not set"


class Evaluate(Node[EvaluateSettings]):
    takes_gray = True
    settings_model = EvaluateSettings

    def run(self, ctx: Context) -> None:
        outcomes = []
        for rule in self.settings.rules:
            passed, detail = _passes(rule, ctx)
            outcomes.append({"node": self.id, "rule": rule.rule, "passed": passed, "detail": detail})
        ctx.setdefault("evaluation", []).extend(outcomes)
        # A later evaluation overwrites an earlier one (PROTOCOL.md 7).
        ctx["result"] = all(outcome["passed"] for outcome in outcomes)
