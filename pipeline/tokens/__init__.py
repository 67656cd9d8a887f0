"""From a trajectory to the student's tokens and the response spans to score."""
