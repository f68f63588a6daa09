// layernorm: to be written.
