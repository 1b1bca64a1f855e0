"""loratune."""
