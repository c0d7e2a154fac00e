"""v6lb.core."""
