"""``cascade filter``: declarative rules over stored scores, one kept-keys file per shard."""
