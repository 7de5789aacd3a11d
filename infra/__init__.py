"""infra package of Headwater."""
