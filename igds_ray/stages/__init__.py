"""Pipeline stages: each a frozen config + pure functions + a rerun-safe `run(cfg)`."""
