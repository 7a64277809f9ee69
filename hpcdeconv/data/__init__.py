"""data subpackage of hpcdeconv."""
