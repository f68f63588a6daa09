// reduce: to be written.
