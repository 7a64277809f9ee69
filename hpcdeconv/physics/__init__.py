"""physics subpackage of hpcdeconv."""
