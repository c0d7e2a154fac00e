"""v6lb.lab."""
