"""The steps of a night (what the Prefect `train` flow wraps): lock, run state, gate, report, publish."""
