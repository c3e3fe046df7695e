"""The virtio-balloon device: its queues, report planning, discard, counters."""
