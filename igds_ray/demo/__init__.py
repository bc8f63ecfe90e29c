"""The embedded default: tiny real models, SAEs and pools built in code (no hub)."""
