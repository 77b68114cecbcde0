"""Pictures of what the data and the method did."""
