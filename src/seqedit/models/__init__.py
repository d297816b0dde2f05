"""Model plumbing: architecture adapters, loading, per-model presets."""
