"""serving package of Headwater."""
