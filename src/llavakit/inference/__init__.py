"""llavakit.inference."""
