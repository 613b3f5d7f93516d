"""schemas package of cascade-data."""
