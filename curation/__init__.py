"""Volume curation: datasets, preprocessing, slicing, manifests, query."""

__version__ = "0.1.0"
