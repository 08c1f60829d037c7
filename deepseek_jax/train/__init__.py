"""Training: optimizer, losses, the jitted sharded train step, metrics and the loop."""
