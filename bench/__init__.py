"""vlpeft bench layer (see DESIGN.md)."""
