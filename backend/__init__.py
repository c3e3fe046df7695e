"""The device (hypervisor) side of vhost-balloon, in rooms by job.

`vhost` (the generic vhost-user server, sessions, rings, guest memory),
`balloon` (the virtio-balloon device, report planning, discards, records),
`latency` (delay models, injection, BQL and mmap_lock contention, the
settings in force), `observe` (trace, metrics, control socket), `server`
(the balloon server that composes them), `qemu` (a real QEMU guest),
`experiment` (sweeps from a spec) and `cli` (`vhost-balloon`); `libc` holds
the syscalls the standard library lacks. docs/architecture.md draws who may
import whom; pyproject.toml's import-linter contracts enforce it.
"""
