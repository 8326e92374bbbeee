"""Pieces every step shares: the error type, atomic files, the case folder, image loading."""
