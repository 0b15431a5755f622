"""measure/: judging models: output error against the original (verify), timing (latency, profile, the
device-side runner), SSH to a device (remote), detection metrics (detection). May import core, graph, io
and calibration; passes use it to judge their own work."""
