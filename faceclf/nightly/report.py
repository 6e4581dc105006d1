"""The night's report.md: data counts, per-class table, confusion matrix, decision and why."""

from __future__ import annotations

from typing import Any, Sequence


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def per_class_rows(classes: Sequence[str], candidate: dict[str, Any], champion: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per class: test images, candidate accuracy, champion accuracy (same test set)."""
    cm = candidate.get("confusion_matrix")
    rows = []
    for i, c in enumerate(classes):
        rows.append({
            "class": c,
            "test_images": (int(sum(cm[i])) if i < len(cm) else 0) if cm is not None
            else candidate.get("per_class_n", {}).get(c),
            "candidate_accuracy": candidate["per_class_accuracy"].get(c),
            "champion_accuracy": (champion or {}).get("per_class_accuracy", {}).get(c) if champion else None,
        })
    return rows


def confusion_markdown(classes: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    """Markdown table of a confusion matrix (rows: true class, columns: predicted)."""
    head = "| true \\ predicted | " + " | ".join(classes) + " |"
    sep = "|" + " --- |" * (len(classes) + 1)
    body = ["| " + c + " | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(classes, matrix)]
    return "\n".join([head, sep, *body])


def render_report(version: str, classes: Sequence[str], metrics: dict[str, Any], decision: dict[str, Any],
                  data: dict[str, Any], champion: dict[str, Any] | None = None) -> str:
    """Markdown for people reading the night's outcome in S3 or the Prefect UI."""
    test = metrics["test"]
    lines = [
        f"# faceclf night: model {version}",
        "",
        f"**Decision: {'PROMOTED' if decision['promote'] else 'REJECTED'}**",
        "",
    ]
    if decision["reasons"]:
        lines += ["Why not:", *[f"- {r}" for r in decision["reasons"]], ""]
    lines += [
        f"Gate: overall >= {decision['gate'].get('min_accuracy')}, every class >= "
        f"{decision['gate'].get('min_class_accuracy')}, not worse than the champion by more than "
        f"{decision['gate'].get('tolerance')}.",
        f"Champion before tonight: {decision.get('champion_version') or 'none'}"
        + (f" (re-scored on tonight's test set: {_pct(decision.get('champion_accuracy'))})" if decision.get("champion_version") else ""),
        "",
        "## Data",
        "",
        "| what | count |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in data.items()],
        "",
        "## Test results",
        "",
        f"Test loss {'n/a' if test['loss'] is None else format(test['loss'], '.4f')}, accuracy "
        f"{_pct(test['accuracy'])} on {test['n']} images "
        f"(best epoch {metrics.get('best_epoch')}, trained on {metrics.get('device')}).",
        "",
        "| class | test images | candidate | champion |",
        "| --- | --- | --- | --- |",
        *[f"| {r['class']} | {r['test_images']} | {_pct(r['candidate_accuracy'])} | {_pct(r['champion_accuracy'])} |"
          for r in per_class_rows(classes, test, champion)],
        "",
        "## Confusion matrix (test)",
        "",
        confusion_markdown(classes, test["confusion_matrix"]) if test.get("confusion_matrix") is not None
        else "Not measured: no weights were kept.",
        "",
    ]
    return "\n".join(lines)
