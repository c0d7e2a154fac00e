"""The Python data plane: ``v6lb run FILE --dataplane python``.

Packets of v6lb's own traffic are steered by ``ip -6 rule``s into TUN devices
and handled by the sans-IO forwarders of :mod:`v6lb.core` (see
docs/dataplane-python.md).
"""

from v6lb.engines.python.run import PythonPlane
from v6lb.engines.python.steer import Side, Steering, plan

__all__ = ["PythonPlane", "Side", "Steering", "plan"]
