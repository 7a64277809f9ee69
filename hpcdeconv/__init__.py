"""hpcdeconv: deep-learning deconvolution for fluorescence microscopy at cluster scale."""

__version__ = "0.1.0"
