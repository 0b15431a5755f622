"""measure/: judging models: output error against the original by the objective of core (verify), task
metrics that gate a result (task: detection agreement, top-1, cosine, mask IoU; detection decodes YOLO
heads), timing (latency, profile, the device-side runner), SSH to a device (remote), the latency search's
timing on a device (device). May import core, graph, io and calibration; passes use it to judge their own work."""
