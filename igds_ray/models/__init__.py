"""Model and SAE loading, the truncated forward pass, and the k-feature encoder."""
