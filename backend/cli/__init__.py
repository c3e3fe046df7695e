"""The `vhost-balloon` command line."""
