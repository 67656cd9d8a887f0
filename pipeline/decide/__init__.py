"""From committed scores to a decision: teachers, trajectories, the report (no torch), and the waves that
score until the decision is made (`waves.py`, the one module here that drives Ray)."""
