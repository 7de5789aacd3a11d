"""Example feature repositories shipped with Headwater."""
