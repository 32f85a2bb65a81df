"""llavakit.cli."""
