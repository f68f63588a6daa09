// dropout: to be written.
