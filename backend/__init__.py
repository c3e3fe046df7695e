"""The device (hypervisor) side of vhost-balloon.

An asyncio vhost-user server (`server`, `session`, `transport`), guest memory
mappings (`mapping`), the virtio-balloon device and its reporting queue
(`balloon`, `reporting`), discard strategies (`discard`), tracing
(`trace`) and the `vhost-balloon` command line (`cli`).
"""
