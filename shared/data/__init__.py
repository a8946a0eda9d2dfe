"""Datasets: the data-prep config, the dataset manifest and the streaming token dataset."""
