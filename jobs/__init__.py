"""Runnable Beam jobs (thin: parse options, wire dataprep transforms, pick the runner) and the demo."""
