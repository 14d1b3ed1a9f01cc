"""Data pipelines: webdataset shards with sample indices (`wds`), synthetic data, the embedded demo set."""
