"""deploy/: from a model to the files that run it on a device: targets (one TOML per device), ONNX Runtime
bundles for the Pi (ort_bundle, with its device-side checker ort_run), TensorRT engines (tensorrt), diffusion
pipelines as folders of ONNX components (pipeline, with its numpy + onnxruntime runner pipeline_run), the
export verb (export). May import every stage up to search; not train."""
