// gelu: to be written.
