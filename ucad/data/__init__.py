"""Data: the layouts a run reads (MVTec AD, VisA), image decoding, structure maps, and the check of every file."""
