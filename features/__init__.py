"""Feature definitions: declared once, computed by every engine with one meaning."""
