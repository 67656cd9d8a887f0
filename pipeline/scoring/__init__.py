"""The student and the RSR math (no Ray)."""
