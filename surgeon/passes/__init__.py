"""Graph rewrite passes over captured programs."""
