"""pipelines package of cascade-data."""
