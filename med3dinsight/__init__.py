"""The two command-line apps, `curate` and `train`: they parse, call the library, and print.

This package sits above `curation`, `captions` and `training`; nothing imports it.
"""
