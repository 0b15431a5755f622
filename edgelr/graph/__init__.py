"""graph/: onnx-ir helpers: finding the layers a pass can rewrite (layers), the low-rank pair as a named
construct (lowrank_pair: the one place that knows how a factorized layer looks in a graph), a layer cut out
as a model of its own (extract), Einsums with a constant weight rewritten as MatMuls the passes see (einsum),
residual blocks y = x + f(x) found from their Add (residual).
May import core."""
