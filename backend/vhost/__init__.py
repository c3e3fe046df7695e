"""The generic vhost-user back-end: sessions, transport, vrings, guest memory.

Knows nothing of balloons: a device plugs in through `device.VirtioDevice`.
"""
