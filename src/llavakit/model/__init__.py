"""llavakit.model."""
