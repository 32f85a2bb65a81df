"""llavakit.evaluation."""
