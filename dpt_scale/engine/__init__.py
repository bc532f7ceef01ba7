"""The DeepSpeed training engine every stage uses: config, EMA, checkpoints, metrics, the loop."""
