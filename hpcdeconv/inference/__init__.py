"""inference subpackage of hpcdeconv."""
