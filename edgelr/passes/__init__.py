"""passes/: one file per transform of an ONNX model, each a frozen Config + a Pass registered for it +
what it did (base holds the interface): prune, factorize, refit, quantize, svdquant (int8 with low-rank
branches), fp16, sparsity (2:4), remove_blocks (whole residual blocks). May import core, graph, io, calibration and measure. Importing the package registers every
pass, so a recipe can name any of them."""

from edgelr.passes import factorize, fp16, prune, quantize, refit, remove_blocks, sparsity, svdquant  # noqa: F401  (registers the passes)
