"""v6lb.engines."""
