"""v6lb.wire."""
