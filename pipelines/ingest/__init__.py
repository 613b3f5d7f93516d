"""``cascade ingest``: existing data (tars, Parquet, folders) or URL lists into image–text shards."""
