"""The daemon and its parts: the link's receiver, the pipeline worker, systemd notify, retention, live events."""
