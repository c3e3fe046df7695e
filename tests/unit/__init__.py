"""Unit tests of the pure protocol package (no sockets, no syscalls)."""
