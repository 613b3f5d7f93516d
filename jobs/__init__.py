"""jobs package of cascade-data."""
