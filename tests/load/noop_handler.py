"""The benchmark's ceiling: a TorchServe handler that answers every request at once without looking at it.

Served with mnist's model-config (same workers, batchSize and maxBatchDelay), it costs what TorchServe itself
costs for a request - HTTP parsing, auth, queueing and batching in the Java frontend, the round trip to the
Python worker and back - and nothing else. No class here: TorchServe calls ``handle`` once with ``data=None``
when the worker loads, then once per batch.
"""

REPLY = b'{"ok":true}'  # tests/load/checks.NOOP_REPLY (this module ships alone in its .mar)


def handle(data, context):
    return None if data is None else [REPLY] * len(data)
