"""``cascade dedup``: exact, perceptual and semantic duplicates among scored samples."""
