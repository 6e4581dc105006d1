"""Is the pipeline stuck? Consecutive rejected nights, or a champion below the bars on the current test split.

A stuck pipeline is quiet by nature (the champion stays, nothing fails), so it is said where people look: at
the top of the night's report, in the rejection notification's subject, and in `faceclf models list`. Both
read the registry's version rows (faceclf.store.registry.list_versions), tonight's added by the caller.
"""

from __future__ import annotations

from typing import Any, Sequence


def rejected_in_a_row(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest versions (oldest first) that the gate or a person rejected, back to the last one promoted."""
    streak: list[dict[str, Any]] = []
    for row in reversed(rows):
        if row.get("promoted") or row.get("gate_passed") is None and not row.get("why"):
            break  # a promoted version ends the streak; so does one without a decision (nothing to count)
        streak.append(row)
    return streak[::-1]


def stuck_reasons(rows: Sequence[dict[str, Any]], champion: str | None, min_rejected: int) -> list[str]:
    """Why the pipeline looks stuck, one sentence each (empty: it does not). ``rows``: version rows, oldest first;
    ``champion``: the champion's version now; ``min_rejected``: rejected nights in a row that count as stuck."""
    reasons = []
    streak = rejected_in_a_row(rows)
    if len(streak) >= min_rejected:
        reasons.append(f"{len(streak)} nights rejected in a row ({streak[0]['version']} to {streak[-1]['version']}); "
                       f"champion {champion or 'none'} stays: last rejection: {streak[-1].get('why') or 'n/a'}")
    newest = next((r for r in reversed(rows) if r.get("gate_passed") is not None), None)
    if newest and newest.get("champion_stale") and champion and newest["version"] != champion:
        reasons.append(f"champion {champion} is below the bars on the test split of night {newest['version']}: "
                       + "; ".join(newest["champion_stale"]))
    return reasons
