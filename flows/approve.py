"""Answer a night that waits for approval (train flow with approval=true), from a terminal:

    python3 -m flows.approve FLOW_RUN_ID --approve --comment "checked the confusion matrix"
    python3 -m flows.approve FLOW_RUN_ID --reject --comment "without_mask regressed on the new camera"

The same as the Prefect UI's resume form: the night goes on with the answer (PREFECT_API_URL names the server).
"""

from __future__ import annotations

import argparse
from uuid import UUID


def answer(flow_run_id: str, approve: bool, comment: str = "") -> None:
    """Resume the paused night ``flow_run_id`` with an approval or a rejection and a comment."""
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(UUID(flow_run_id), run_input={"approve": approve, "comment": comment})


def main(argv: list[str] | None = None) -> None:
    """python3 -m flows.approve FLOW_RUN_ID (--approve | --reject) [--comment TEXT]"""
    p = argparse.ArgumentParser(prog="python3 -m flows.approve", description="Approve or reject a paused night.")
    p.add_argument("flow_run_id", help="the paused train flow run (its id in the Prefect UI)")
    choice = p.add_mutually_exclusive_group(required=True)
    choice.add_argument("--approve", action="store_true", help="promote the candidate")
    choice.add_argument("--reject", action="store_true", help="keep the champion")
    p.add_argument("--comment", default="", help="why: kept in decision.json and the report")
    a = p.parse_args(argv)
    answer(a.flow_run_id, a.approve, a.comment)
    print(f"{'approved' if a.approve else 'rejected'}: flow run {a.flow_run_id} resumes")


if __name__ == "__main__":
    main()
