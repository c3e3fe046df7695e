"""The mocked guest: a vhost-user front-end (what QEMU does) and a model of
Linux's virtio-balloon free page reporting driver (what the guest kernel does).

It never imports `backend`: the two meet over a unix socket, as QEMU and a
real back-end would. Modules: `ram` (memfd-backed guest RAM), `channel`
(framed messages and fds over a unix socket), `frontend` (the vhost-user
front-end), `driver` (the reporting driver), `summary` (statistics and the
JSON summary), `runner` (wires them together), `cli` (`python -m vhost_balloon.guest`).
"""
