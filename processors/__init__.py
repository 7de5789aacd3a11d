"""processors package of Headwater."""
