"""Format checks run before a C++ reader sees a file: one module per format (see crossdiff.file_checks)."""
