"""losses subpackage of hpcdeconv."""
