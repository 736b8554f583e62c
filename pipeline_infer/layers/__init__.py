"""Building blocks the model files assemble: norms, rotary embedding, activation, attention."""
