"""Benchmarks of TinyGPT: they import `tinygpt`, never the reverse. Run them with `make bench`."""
