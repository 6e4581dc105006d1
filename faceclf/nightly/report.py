"""The night's report.md: data counts, per-class table, confusion matrix, decision and why."""

from __future__ import annotations

from typing import Any, Sequence

from faceclf.nightly.gate import num


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _ci(acc: dict[str, Any] | None) -> str:
    """'98.20% [94.21, 99.50]' or 'n/a'."""
    if not acc or acc.get("value") is None:
        return "n/a"
    ci = f" [{100 * acc['low']:.2f}, {100 * acc['high']:.2f}]" if acc.get("low") is not None else ""
    return f"{_pct(acc['value'])}{ci}"


def interval_rows(classes: Sequence[str], candidate: dict[str, Any] | None, champion: dict[str, Any] | None) -> list[str]:
    """Markdown rows: overall, then each class; candidate and champion accuracy with interval, and n."""
    if candidate is None:
        return ["| overall | n/a | n/a | n/a |"]
    rows = [("overall", candidate["accuracy"], (champion or {}).get("accuracy"))]
    rows += [(c, candidate["per_class"].get(c), (champion or {}).get("per_class", {}).get(c)) for c in classes]
    return [f"| {name} | {(cand or {}).get('n', 0)} | {_ci(cand)} | {_ci(champ)} |" for name, cand, champ in rows]


def paired_lines(paired: dict[str, Any] | None, champion_version: str | None) -> list[str]:
    """The image-by-image comparison with the champion, in words (nothing without a champion)."""
    if not paired:
        return []
    return [f"Image by image against champion {champion_version} on the same {paired['n']} test images: the "
            f"candidate alone right on {paired['candidate_only']}, the champion alone right on "
            f"{paired['champion_only']}, both right on {paired['both']}, both wrong on {paired['neither']} "
            f"(exact McNemar p = {paired['p_value']:.3g}).", ""]


def points(x: float) -> str:
    """An accuracy difference in percentage points: '6.1', or '0.35' below one point (never a bare '0.0')."""
    return f"{100 * x:.1f}" if 100 * x >= 1 else f"{100 * x:.2g}"


def detectable_lines(detectable: dict[str, Any] | None) -> list[str]:
    """One sentence: the smallest difference tonight's test set resolves (gate.detectable), so that a
    'not significant' is read as 'smaller than this, or absent', not as 'the same'."""
    if not detectable:
        return []
    n, alpha, diff = detectable["n"], detectable["alpha"], detectable["difference"]
    if detectable["method"] != "exact McNemar":
        return [f"No paired comparison: on these n={n} test images the candidate's accuracy is known to within "
                f"±{points(diff)} points (Wilson interval at alpha {alpha:g}, no power attached); a difference from "
                "any fixed accuracy smaller than that cannot be told apart.", ""]
    share = f"{points(detectable['discordant'])}% discordant"
    if detectable["discordant"] > detectable["discordant_observed"]:  # floored (stats.discordant_share)
        k = detectable["discordant_images"]
        share = (f"{k} discordant image{'s' if k != 1 else ''}, taken as {share}: the Wilson 95% upper bound "
                 f"of none in {n}")
    power = f"{100 * detectable['power']:.0f}% power"
    if diff is None:
        return [f"This test set (n={n}, {share}) cannot detect any accuracy difference at alpha {alpha:g} with "
                f"{power}: too few images, so every comparison on it reads as 'not significant'.", ""]
    return [f"This test set (n={n}, {share}) detects a difference of {points(diff)} points at alpha {alpha:g} with "
            f"{power} (exact McNemar test); a smaller real difference reads as 'not significant'.", ""]


def class_lines(classes: list[dict[str, Any]] | None, champion_version: str | None) -> list[str]:
    """Each class, both models on the same test images: precision, recall, F1, and the permutation test's
    p-value that the candidate's F1 is lower by chance (nothing without a champion to pair with)."""
    if not classes:
        return []
    rows = [f"| {c['cls']} | {c['n']} | {num(c['candidate_precision'])} / {num(c['candidate_recall'])} / "
            f"{num(c['candidate_f1'])} | {num(c['champion_precision'])} / {num(c['champion_recall'])} / "
            f"{num(c['champion_f1'])} | {c['p_worse']:.3g} |" for c in classes]
    return [f"Per class against champion {champion_version} (precision / recall / F1; p: a paired permutation test "
            "that the candidate's F1 is this much lower by chance):", "",
            "| class | test images | candidate | champion | p |", "| --- | --- | --- | --- | --- |", *rows, ""]


def stale_lines(decision: dict[str, Any]) -> list[str]:
    """The champion fails the bars on tonight's test set: it could not veto (said near the top)."""
    stale = decision.get("champion_stale") or []
    if not stale:
        return []
    return [f"**The champion is stale:** re-scored on tonight's test images, {'; '.join(stale)}. It could not veto: "
            "the candidate had to clear the bars and be better overall on the same images.", ""]


def calibration_lines(calibration: dict[str, Any] | None) -> list[str]:
    """One line on the temperature scaling folded into the exported model (metrics "calibration"): the
    temperature, the val images it was fitted on, and the test set's expected calibration error before -> after
    ('Calibration: temperature 1.84 fitted on 120 val images; ECE (test) 0.081 -> 0.023')."""
    if not calibration or calibration.get("temperature") is None:
        return []
    val, test = calibration.get("val") or {}, calibration.get("test") or {}
    line = f"Calibration: temperature {calibration['temperature']:.2f} fitted on {val.get('n', 'n/a')} val images"
    if test.get("ece_before") is not None and test.get("ece_after") is not None:
        line += f"; ECE (test) {test['ece_before']:.3f} -> {test['ece_after']:.3f}"
    return [line, ""]


def champion_estimate_lines(estimate: dict[str, Any] | None) -> list[str]:
    """The champion between nights: its last scoring run's label-free accuracy estimate (a dict as
    faceclf.store.registry.read_estimate returns it) against its test accuracy, with the alarms it raised."""
    if not estimate:
        return []
    lines = ["## The champion between nights", ""]
    if estimate["estimated_accuracy"] is None:
        return lines + [f"Champion {estimate['version']}'s last scoring run ({estimate['source']}, "
                        f"{estimate['scored_at']}) scored no image: no estimate.", ""]
    low, high = estimate["interval"]
    test = estimate.get("test_accuracy")
    against = f"{_pct(test)} on its test set." if test is not None else "no test accuracy recorded in the model."
    lines.append(f"Champion {estimate['version']}'s last scoring run ({estimate['source']}, {estimate['scored_at']}): "
                 f"estimated accuracy {_pct(estimate['estimated_accuracy'])} [{100 * low:.2f}, {100 * high:.2f}] on "
                 f"{estimate['n']} scored images, from its confidences alone (no labels), against {against}")
    alarms = estimate.get("alarms") or []
    lines += ["", *(["Alarms:", *[f"- {a}" for a in alarms]] if alarms else ["No alarm."]), ""]
    return lines


def confusion_markdown(classes: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    """Markdown table of a confusion matrix (rows: true class, columns: predicted)."""
    head = "| true \\ predicted | " + " | ".join(classes) + " |"
    sep = "|" + " --- |" * (len(classes) + 1)
    body = ["| " + c + " | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(classes, matrix)]
    return "\n".join([head, sep, *body])


def render_report(version: str, classes: Sequence[str], metrics: dict[str, Any], decision: dict[str, Any],
                  data: dict[str, Any], stuck: Sequence[str] = (),
                  champion_estimate: dict[str, Any] | None = None) -> str:
    """Markdown for people reading the night's outcome in S3 or the Prefect UI; ``stuck``: why the pipeline is
    stuck (faceclf.nightly.stuck), said first; ``champion_estimate``: the champion's last label-free estimate
    from a scoring run (faceclf.store.registry.read_estimate), its own section."""
    test = metrics["test"]
    lines = [f"# faceclf night: model {version}", ""]
    if stuck:
        lines += ["> **The pipeline is stuck:**", *[f"> - {s}" for s in stuck], ""]
    lines += [
        f"**Decision: {'PROMOTED' if decision['promote'] else 'REJECTED'}**",
        "",
    ]
    if decision.get("why"):
        lines += [decision["why"], ""]
    lines += stale_lines(decision)
    if decision["reasons"]:
        lines += ["Why not:", *[f"- {r}" for r in decision["reasons"]], ""]
    gate = decision["gate"]
    lines += [
        f"Gate: overall >= {gate.get('min_accuracy')}, every class >= {gate.get('min_class_accuracy')}; against the "
        f"champion on the same test images: not worse by more than {gate.get('tolerance')}, not significantly worse "
        f"(exact McNemar test, alpha {gate.get('alpha')}), no class's F1 significantly worse by more than "
        f"{gate.get('class_tolerance')} (paired permutation test); a champion below the bars cannot veto"
        + (", and significantly better (require_improvement)." if gate.get("require_improvement") else "."),
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
        *calibration_lines(metrics.get("calibration")),
        "Accuracies with their Wilson 95% interval and the number of test images:",
        "",
        "| | test images | candidate | champion |",
        "| --- | --- | --- | --- |",
        *interval_rows(classes, decision.get("candidate"), decision.get("champion")),
        "",
        *paired_lines(decision.get("paired"), decision.get("champion_version")),
        *detectable_lines(decision.get("detectable")),
        *class_lines(decision.get("classes"), decision.get("champion_version")),
        "## Confusion matrix (test)",
        "",
        confusion_markdown(classes, test["confusion_matrix"]) if test.get("confusion_matrix") is not None
        else "Not measured: no weights were kept.",
        "",
        *champion_estimate_lines(champion_estimate),
    ]
    return "\n".join(lines)
