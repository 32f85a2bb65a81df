"""llavakit.training."""
