"""methods subpackage of hpcdeconv."""
