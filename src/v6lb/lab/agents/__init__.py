"""Small programs the labs run inside network namespaces (``python -m v6lb.lab.agents.NAME``).

* :mod:`~v6lb.lab.agents.greet_server`: a TCP server that answers with its own address;
* :mod:`~v6lb.lab.agents.traffic`: timed client traffic to a VIP (long-lived flows and
  new connections), reported as JSON.
"""
