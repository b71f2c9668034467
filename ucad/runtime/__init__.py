"""Where and how code runs: the torch device, phase timing, the errors that reach the user as one line."""
