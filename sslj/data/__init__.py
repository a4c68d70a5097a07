"""Datasets, label splits and augmentation for sslj.

`sources.load_arrays(name, data_dir=...)` gives every split of a dataset as
uint8 arrays; `splits.semi_supervised(...)` picks the labelled subset and the
unlabelled pool.
"""
