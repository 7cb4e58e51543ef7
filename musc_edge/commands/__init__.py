"""One module per CLI command; each parses flags and calls a library function."""
