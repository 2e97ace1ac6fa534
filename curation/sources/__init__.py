"""The cases of a dataset: finders for each layout, one walk of the root, volume specs."""

DATASETS = ("3dseg8", "nifti", "dicom", "msd")  # the layouts `datasets.discover` knows (light: the CLI reads it)
