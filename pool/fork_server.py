"""Imported once, by `pool start`'s fork server alone (the first module it preloads), for one
side effect: the server blocks SIGTERM, SIGINT and SIGHUP for its whole life.

A signal sent to pool start's whole process group (a closing terminal, supervisord's
`stopasgroup`, `kill -- -PGID`) must not end the server: every child that died after it could no
longer be replaced, and the children it forked would look dead to pool start. Python's start-up
leaves SIGINT and SIGTERM unblocked in the server whatever pool start's mask was. Every child
inherits this mask and takes the signals with its own relay thread (pool/signal_relay.py).
"""

import signal

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
