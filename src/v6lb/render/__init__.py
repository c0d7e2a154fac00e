"""v6lb.render."""
