"""Payload formats beside JSON/msgpack (see docs/topics.md), one module per format.

Stateless formats (``senml``, ``influx_line``) turn one payload into samples on their own.
Stateful formats (``value``: one value per topic; ``sparkplug_b``) parse the payload here
and hand the parsed message to their *session*, which the :class:`~edgeml.core.assemble.
Assembler` keeps per pipeline and feeds in archive order, so the daemon and ``edgeml replay``
build the same samples from the same archived sequence.

Nothing here imports ``protobuf``: :mod:`.sparkplug` is imported only when a pipeline uses
``sparkplug_b``.
"""

from __future__ import annotations

#: the formats this package adds to ``json``/``msgpack``/``auto``
EXTRA_FORMATS = ("senml", "influx_line", "value", "sparkplug_b")
#: formats whose samples depend on earlier messages (assembled by a session)
STATEFUL_FORMATS = ("value", "sparkplug_b")
#: the largest float32: a larger value would become infinite in the model's input
F32_MAX = 3.4028234663852886e38
