"""io/: getting things in and out: models (load, save atomically, the one ONNX Runtime session factory),
sample inputs (.npz, checked against the model), the on-disk cache, diffusers pipeline folders (diffusers_dir). May import core and graph."""
