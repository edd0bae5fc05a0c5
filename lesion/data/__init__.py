"""Data sources, splits, preprocessing, augmentation and the ingested shard format."""
