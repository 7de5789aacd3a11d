"""batch package of Headwater."""
