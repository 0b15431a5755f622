"""core/: the numerics every stage shares, framework-free: whitened SVD (lowrank), rank allocation against a
budget (allocate), cost models (costs). Imports numpy and scipy only, and nothing else of edgelr but errors."""
