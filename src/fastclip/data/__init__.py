"""The input pipeline: shards (`shards`) or a CSV (`csv`), decoded samples (`samples`), batches with
positions (`loader`)."""
