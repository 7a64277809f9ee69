"""training subpackage of hpcdeconv."""
