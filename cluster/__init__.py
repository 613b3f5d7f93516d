"""cluster package of cascade-data."""
