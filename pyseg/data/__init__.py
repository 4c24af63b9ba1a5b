"""Datasets: YAML resolution, download, labels, augmentation, loaders."""
