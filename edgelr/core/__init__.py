"""core/: the numerics every stage shares, framework-free: whitened SVD (lowrank), rank allocation against a
budget (allocate), cost models (costs), the objective (each output and channel group on its own scale). Imports numpy and scipy only, and nothing else of edgelr but errors."""
