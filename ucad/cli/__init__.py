"""The command-line layer: click commands and options built from the typed configuration (ucad.config)."""
