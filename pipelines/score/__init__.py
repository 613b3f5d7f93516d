"""``cascade score``: CLIP-L aesthetic, image–text similarity and size scores, one scores file per shard."""
