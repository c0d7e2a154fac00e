"""v6lb.model."""
