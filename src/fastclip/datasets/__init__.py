"""Embedded data sets: Fashion-MNIST demo, scikit-learn digits, synthetic pairs, and the shard writer."""
