"""Which features the device offers: the `--features` option, and the QEMU
device properties that follow from them.

The offer decides the queues (inflate, deflate, then stats and reporting
only when offered and accepted), so QEMU's vhost-user-test-device must be
given a matching `num_vqs`; `config_size` is 16 (num_pages, actual,
free_page_hint_cmd_id, poison_val), as QEMU's own device has when it offers
PAGE_POISON.
"""

from __future__ import annotations

from vhost_balloon.protocol import virtio

# By default everything a Linux guest can use here, except the stats queue:
# it adds a queue, and so changes the num_vqs a QEMU command line must give.
OFFERED_FEATURES = virtio.feature_mask(
    virtio.F_VERSION_1,
    virtio.BALLOON_F_MUST_TELL_HOST,
    virtio.BALLOON_F_DEFLATE_ON_OOM,
    virtio.BALLOON_F_REPORTING,
    virtio.BALLOON_F_PAGE_POISON,
    virtio.F_INDIRECT_DESC,
    virtio.F_EVENT_IDX,
)

# The names --features takes.
CHOICES = {
    "must-tell-host": virtio.BALLOON_F_MUST_TELL_HOST,
    "stats-vq": virtio.BALLOON_F_STATS_VQ,
    "deflate-on-oom": virtio.BALLOON_F_DEFLATE_ON_OOM,
    "page-poison": virtio.BALLOON_F_PAGE_POISON,
    "reporting": virtio.BALLOON_F_REPORTING,
    "indirect-desc": virtio.F_INDIRECT_DESC,
    "event-idx": virtio.F_EVENT_IDX,
}
NOT_OFFERED = {
    "free-page-hint": "free page hinting is not built: QEMU uses it only to skip free pages "
    "while migrating, and vhost-user-test-device cannot migrate (docs/device.md)",
    "version-1": "VERSION_1 is always offered",
}
CONFIG_SIZE = virtio.BalloonConfig.SIZE


def parse_features(text: str) -> int:
    """`stats-vq,reporting` (exactly these, with VERSION_1), or `+stats-vq,-deflate-on-oom`
    (changes to the default offer). ValueError naming the bad item otherwise."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("no feature given")
    signed = [item[0] in "+-" for item in items]
    if any(signed) and not all(signed):
        raise ValueError("give either a whole list (a,b) or changes (+a,-b), not both")
    features = OFFERED_FEATURES if all(signed) else virtio.feature_mask(virtio.F_VERSION_1)
    for item in items:
        sign, name = (item[0], item[1:]) if item[0] in "+-" else ("+", item)
        if name in NOT_OFFERED:
            raise ValueError(f"{name}: {NOT_OFFERED[name]}")
        if name not in CHOICES:
            raise ValueError(f"unknown feature {name!r}; known: {', '.join(CHOICES)}")
        bit = 1 << CHOICES[name]
        features = features | bit if sign == "+" else features & ~bit
    return features


def qemu_device_properties(features: int) -> str:
    """The vhost-user-test-device properties for this offer, ready to paste
    after `-device vhost-user-test-device-pci,chardev=ID,`."""
    queues = virtio.balloon_queues(features).count
    return f"virtio-id={virtio.VIRTIO_ID_BALLOON},num_vqs={queues},config_size={CONFIG_SIZE}"
