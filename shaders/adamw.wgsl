// adamw: to be written.
