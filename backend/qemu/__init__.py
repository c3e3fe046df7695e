"""A real QEMU guest: provisioning, launch, its console, attribution of failures."""
