"""vlpeft tasks layer (see DESIGN.md)."""
