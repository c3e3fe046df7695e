"""What a running backend shows: the per-report trace, metrics, the control socket."""
