// embedding: to be written.
