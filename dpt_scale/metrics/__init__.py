"""Generation metrics: FID, KID and precision/recall (torch-fidelity's formulas) and conditional
accuracy, computed from shard sets with a registry of feature extractors (`evaluators`)."""
