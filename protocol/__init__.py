"""Pure formats for vhost-balloon: no sockets, no asyncio, no syscalls.

vhost-user messages (`vhost_user`), virtio and balloon constants (`virtio`),
guest-address translation (`memory`) and the split virtqueue seen from both
sides (`virtqueue`). Both the backend and the mocked guest build on this.
"""
