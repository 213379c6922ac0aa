"""The reconcile loop: runs passes one at a time on triggers (commit, webhook, interval, request).

Layering: loop sits above `engine` and `sources` and below `server` and `cli`. `events` is the
vocabulary the loop shares with what watches it (the HTTP server, metrics, notifiers).
"""
