"""The torch side: distillation of an ONNX student towards its ONNX teacher, and torch low-rank modules.

Owns: ONNX <-> torch conversion (convert), training data and augmentation (data), the distillation
losses (losses), quantization-aware training (qat), the training loop with its schedule and checkpoints
(loop), distributed training over torch.distributed (parallel), the `distill` verb with its
DistillConfig (distill), low-rank factorization of torch modules (lowrank), and VMamba's SS2D block with an
exportable selective scan and its state and width reductions (ss2d), with their structure-aware distillation
(structured).

May import: edgelr.core, graph, io, calibration, measure, passes (and edgelr.errors); never search,
deploy, report, api or cli. torch and onnx2torch are imported by the modules that need them, so
importing this package costs nothing.
"""
