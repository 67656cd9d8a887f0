"""From committed scores to a decision: teachers, trajectories, the report (no torch)."""
