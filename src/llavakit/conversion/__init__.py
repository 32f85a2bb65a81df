"""llavakit.conversion."""
