"""llavakit.data."""
