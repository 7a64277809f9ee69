"""classical subpackage of hpcdeconv."""
