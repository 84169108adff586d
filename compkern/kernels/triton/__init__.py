"""Triton kernels, one file per op. Imported lazily by the ops (triton may be absent)."""
