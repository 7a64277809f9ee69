"""models subpackage of hpcdeconv."""
