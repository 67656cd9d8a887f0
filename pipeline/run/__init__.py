"""One scoring run on Ray: config, stages, results and the committed output."""
