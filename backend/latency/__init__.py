"""Latency injection: delay models, precise sleeps, injection points, BQL and
mmap_lock contention, and the settings in force."""
