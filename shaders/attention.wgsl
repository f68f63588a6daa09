// attention: to be written.
