"""stages package of cascade-data."""
