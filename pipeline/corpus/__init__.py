"""Reading a corpus: files to rows, rows to trajectories."""
