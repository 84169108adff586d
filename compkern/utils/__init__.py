"""Small shared utilities (atomic checkpoints)."""
