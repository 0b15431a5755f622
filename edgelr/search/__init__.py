"""search/: budget searches that measure and correct: per-layer latency tables (tables) and the latency
rounds that factorize, time the whole model and correct the budget (latency). May import every stage up to
passes."""
